"""Overfitting rules: eval rising, a growing train-eval gap, memorization, epoch-boundary drops.

- overfitting: eval loss rose at 2 evals in a row, to > EVAL_RISE (3%) above its best (a plateau within
  a few % of the best is not overfitting), while train loss fell. Or a sustained rise: the last
  SUSTAINED_EVALS evals after the best all above it by > EVAL_SUSTAINED (1%), with train down by
  TRAIN_FELL since the best. Post hoc (diagnose.py) it counts only while one of the two still holds at
  the end of the run.
- eval_degradation (error): eval loss at >= EVAL_DEGRADE x its best while train loss did not fall by
  TRAIN_FELL (5%) since that best eval: the run is getting worse at everything, a divergence (with
  train falling it is overfitting). Over once eval is back under that line.
- eval_rising (warning), at the end of a run with at least 3 evals: the last eval is >= EVAL_RISING x
  the best, at least 2 evals after it, with train not falling by TRAIN_FELL since then: milder than
  eval_degradation (unstable).
- eval_non_finite (warning): a NaN/inf eval loss while training is finite.
- generalization_gap: eval minus the mean of the last 10 train losses > GAP_LIMIT (healthy is about
  0.1-0.3) plus 2 standard errors of that mean, and growing.
- memorization: train < MEMORIZED_TRAIN with eval > MEMORIZED_EVAL.
- epoch_drop: train loss falls at an epoch boundary by > EPOCH_DROP of it (and > EPOCH_DROP_MIN),
  > 3x its fall just before, and > 3 standard errors of its noise.
- generalization_gap and epoch_drop are signs, not proof: warnings that count toward no verdict.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Any, NamedTuple

from tunewise.doctor.advice import divergence_advice, eval_non_finite_advice, overfit_advice
from tunewise.doctor.curve import finite
from tunewise.doctor.findings import Advice, Finding, num

if TYPE_CHECKING:
    from tunewise.doctor.watcher import CurveWatcher

GAP_LIMIT, MEMORIZED_TRAIN, MEMORIZED_EVAL = 0.3, 0.1, 1.0
EPOCH_DROP, EPOCH_DROP_MIN, EVAL_RISE = 0.10, 0.05, 0.03
EVAL_DEGRADE, EVAL_RISING, TRAIN_FELL = 1.5, 1.2, 0.05
EVAL_SUSTAINED, SUSTAINED_EVALS, TRAIN_LEVEL_POINTS = 0.01, 3, 5


class _Eval(NamedTuple):
    step: int
    loss: float
    train: float | None  # recent train loss, for the gap
    train_se: float  # its standard error
    epoch: float | None
    level: float | None = None  # the train loss's level at this eval (robust median), to compare evals by


class OverfittingRules:
    """The overfitting family: reads the evaluations against the train losses around them."""

    def __init__(self, watch: CurveWatcher):
        self.watch = watch
        self.by_epoch: dict[int, list[float]] = {}  # epoch index -> its finite train losses
        self.evals: list[_Eval] = []

    def record(self, step: int, loss: float, epoch: float | None) -> None:
        """File a finite train loss under its epoch (from the logged epoch, else steps_per_epoch)."""
        per_epoch = self.watch.steps_per_epoch
        # Trainer logs epoch 1.0 on the last step of the first epoch, so (0, 1] is epoch 0.
        index = (
            max(0, math.ceil(epoch - 1e-9) - 1)
            if finite(epoch) and epoch > 0
            else (step - 1) // per_epoch
            if per_epoch
            else None
        )
        if index is not None:
            self.by_epoch.setdefault(index, []).append(loss)

    def observe_eval(self, step: int, eval_loss: float | None, epoch: float | None) -> list[Finding]:
        if not finite(eval_loss):
            return self._non_finite(step, eval_loss)
        self.watch.close("eval_non_finite", step)
        self.evals.append(_Eval(step, eval_loss, *self._recent_train(), epoch, self._train_level(step)))
        if eval_loss <= min(e.loss for e in self.evals):
            self.watch.close("overfitting", step)
        new = self._check_eval_rising(step) + self._check_sustained(step) + self._check_gap(step)
        return new + self._check_memorized(step) + self._check_degradation(step)

    def eval_fell(self, fraction: float) -> bool:
        """The last eval is more than `fraction` below the first one."""
        return len(self.evals) >= 2 and self.evals[-1].loss < (1 - fraction) * self.evals[0].loss

    def still_above_best(self) -> bool:
        """At the end: the last eval is still more than EVAL_RISE above the best, or the rise is sustained,
        and train loss fell since the best (overfitting is train improving while eval worsens: an eval that
        drifts up while train has plateaued too is a plateau, not overfitting)."""
        if not self.evals:
            return False
        best = min(self.evals, key=lambda e: e.loss)
        above = self.evals[-1].loss > (1 + EVAL_RISE) * best.loss or self._sustained()
        return above and self._train_fell(best, self.evals[-1])

    def _sustained(self) -> bool:
        """The last SUSTAINED_EVALS evals, all after the best, are above it by EVAL_SUSTAINED; train fell."""
        at = min(range(len(self.evals)), key=lambda i: self.evals[i].loss)
        best, last = self.evals[at], self.evals[-SUSTAINED_EVALS:]
        if len(self.evals) - 1 - at < SUSTAINED_EVALS:
            return False
        above = all(e.loss > (1 + EVAL_SUSTAINED) * best.loss for e in last)
        return above and self._train_fell(best, self.evals[-1])

    def _check_sustained(self, step: int) -> list[Finding]:
        if not self._sustained() or not self.watch.open("overfitting", step):
            return []
        best = self._best_eval()
        last = self.evals[-SUSTAINED_EVALS:]
        title = (
            f"eval loss stayed above its best {num(best['best_eval_loss'])} (step {best['best_eval_step']}) "
            "for "
            f"the last {len(last)} evals ({', '.join(num(e.loss) for e in last)} at step {step}) while train "
            f"loss fell to {num(last[-1].train)}"
        )
        evidence = {"step": step, "eval_loss": last[-1].loss, "train_loss": last[-1].train, **best}
        return [Finding(step, "warning", "overfitting", title, evidence, *self.advice())]

    def _non_finite(self, step: int, eval_loss: float | None) -> list[Finding]:
        if not self.watch.open("eval_non_finite", step):
            return []
        last = self.watch.losses[-1] if self.watch.losses else None
        title = (
            f"eval loss is {num(eval_loss)} at step {step} while the train loss is finite"
            + (f" ({num(last[1])} at step {last[0]})" if last else "")
            + ": the evaluation says nothing about overfitting"
        )
        evidence = {"step": step, "eval_loss": eval_loss, "train_loss": last[1] if last else None}
        advice = eval_non_finite_advice(self.watch.precision)
        return [Finding(step, "warning", "eval_non_finite", title, evidence, *advice)]

    def finish(self) -> list[Finding]:
        """At the end of the run: an eval degradation that train loss later outlearned, and eval_rising."""
        return self._degradation_was_overfitting() + self._ended_rising()

    def _degradation_was_overfitting(self) -> list[Finding]:
        """An open eval_degradation whose train loss fell well below its level at the best eval by the end:
        the model kept learning the train set while eval worsened, which is overfitting, not a divergence
        (when it fired, train had not fallen yet)."""
        if "eval_degradation" not in self.watch.open_episodes or not self.evals:
            return []
        best, now = min(self.evals, key=lambda e: e.loss), self.evals[-1]
        if not self._train_fell(best, now):
            return []
        self.watch.open_episodes.pop("eval_degradation")
        began = self.watch.open("overfitting", now.step)  # False: an overfitting finding already says it
        for f in self.watch.findings:
            if f.code == "eval_degradation" and f.severity == "error":
                f.severity = "info"
                f.title += f"; train loss then fell to {num(now.train)}: overfitting, not a divergence"
        if not began:
            return []
        title = (
            f"eval loss ended at {num(now.loss)} (step {now.step}), {now.loss / best.loss:.1f}x its best "
            f"{num(best.loss)} at step {best.step}, while train loss fell from "
            f"{num(self._train_at(best))} to {num(now.train)}: the training set is being memorized"
        )
        evidence = {"step": now.step, "eval_loss": now.loss, "train_loss": now.train, **self._best_eval()}
        evidence["train_loss_at_best"] = self._train_at(best)
        return [Finding(now.step, "warning", "overfitting", title, evidence, *self.advice())]

    def _ended_rising(self) -> list[Finding]:
        """eval_rising: the run ended worse on held-out data than at its best, not learning the train set."""
        if len(self.evals) < 3 or "eval_degradation" in self.watch.open_episodes:
            return []
        best = min(self.evals, key=lambda e: e.loss)
        now = self.evals[-1]
        after = sum(e.step > best.step for e in self.evals)
        if after < 2:  # one eval up from the best is a tick, not a rise (as for overfitting)
            return []
        if best.loss <= 0 or now.loss < EVAL_RISING * best.loss or self._train_fell(best, now):
            return []
        title = (
            f"eval loss ended at {num(now.loss)} (step {now.step}), {now.loss / best.loss:.2f}x its best "
            f"{num(best.loss)} at step {best.step}, and train loss did not fall meanwhile"
        )
        evidence = {
            "step": now.step,
            "eval_loss": now.loss,
            "train_loss": now.train,
            "train_loss_at_best": best.train,
            "ratio": now.loss / best.loss,
            **self._best_eval(),
        }
        return [Finding(now.step, "warning", "eval_rising", title, evidence, *self._divergence_advice())]

    def _train_fell(self, best: _Eval, now: _Eval) -> bool:
        """Train loss at `now` is more than TRAIN_FELL below its level at the `best` eval."""
        before, after = self._train_at(best), self._train_at(now)
        return before is not None and after is not None and after < (1 - TRAIN_FELL) * before

    def _train_level(self, step: int) -> float | None:
        """The median of the train losses since the previous eval, and of at least the last
        TRAIN_LEVEL_POINTS or a tenth of the run so far: one noisy log (train and eval logged at the same
        cadence leave one train loss between evals) or the steep start of a run (the mean of the losses
        before an early eval) does not decide whether train fell."""
        since = self.evals[-1].step if self.evals else -1
        upto = [(s, x) for s, x in self.watch.losses if s <= step]
        recent = [x for s, x in upto if s > since]
        least = max(TRAIN_LEVEL_POINTS, len(upto) // 10)
        if len(recent) < least:
            recent = [x for _, x in upto[-least:]]
        return statistics.median(recent) if recent else None

    def _train_at(self, e: _Eval) -> float | None:
        """The train loss's level at an eval, else (an eval before any train log, e.g. every epoch with
        train logged every 500 steps) the first train loss logged after it."""
        if e.level is not None:
            return e.level
        return next((x for step, x in self.watch.losses if step > e.step), None)

    def _divergence_advice(self) -> Advice:
        w = self.watch
        return divergence_advice(
            w.method, w.learning_rate or w.peak_lr, w.max_grad_norm, w.warmup_steps, w.total_steps
        )

    def _check_degradation(self, step: int) -> list[Finding]:
        """Eval far above its best while train did not fall since then: worse at everything."""
        best = min(self.evals, key=lambda e: e.loss)
        now = self.evals[-1]
        if "eval_degradation" in self.watch.open_episodes:
            if now.loss < EVAL_DEGRADE * best.loss:
                self.watch.close("eval_degradation", step)
            return []
        if now.loss < EVAL_DEGRADE * best.loss or self._train_fell(best, now) or best.loss <= 0:
            return []
        self.watch.open("eval_degradation", best.step)
        title = (
            f"eval loss rose to {num(now.loss)} at step {step}, {now.loss / best.loss:.1f}x its best "
            f"{num(best.loss)} at step {best.step}, and train loss did not fall meanwhile "
            f"({num(best.train)} -> {num(now.train)}): the run degraded"
        )
        evidence = {
            "step": step,
            "eval_loss": now.loss,
            "train_loss": now.train,
            "train_loss_at_best": best.train,
            "ratio": now.loss / best.loss,
            **self._best_eval(),
        }
        return [Finding(step, "error", "eval_degradation", title, evidence, *self._divergence_advice())]

    def _recent_train(self) -> tuple[float | None, float]:
        """Mean of the last 10 train losses since the previous eval, and its standard error."""
        losses = self.watch.losses
        since = self.evals[-1].step if self.evals else -1
        recent = [x for step, x in losses if step > since][-10:] or [x for _, x in losses[-10:]]
        if len(recent) < 2:
            return (recent[0] if recent else None), 0.0
        return statistics.fmean(recent), statistics.stdev(recent) / math.sqrt(len(recent))

    def _best_eval(self) -> dict[str, Any]:
        if not self.evals:
            return {}
        best = min(self.evals, key=lambda e: e.loss)
        return {"best_eval_step": best.step, "best_eval_loss": best.loss, "best_eval_epoch": best.epoch}

    def check_epoch_drop(self, step: int) -> list[Finding]:
        if not self.by_epoch or self.watch.fired("epoch_drop"):
            return []
        index = max(self.by_epoch)
        now, before = self.by_epoch[index], self.by_epoch.get(index - 1, [])
        if len(now) != 3 or len(before) < 6:
            return []
        last, after = statistics.fmean(before[-3:]), statistics.fmean(now)
        drop, trend = last - after, statistics.fmean(before[-6:-3]) - last
        diffs = [b - a for a, b in zip(before, before[1:], strict=False)]
        noise = statistics.stdev(diffs) / math.sqrt(2)
        # 3 standard errors of the difference of two 3-point means
        if drop <= max(EPOCH_DROP * last, EPOCH_DROP_MIN, 3 * trend, 3 * noise * math.sqrt(2 / 3)):
            return []
        title = (
            f"train loss dropped {drop / last:.0%} at the start of epoch {index + 1} ({num(last)} -> "
            f"{num(after)}) against {num(trend)} over the steps before: the model is memorizing"
        )
        evidence = {
            "step": step,
            "epoch": index + 1,
            "loss_before": last,
            "loss_after": after,
            "drop": drop,
            "drop_before": trend,
            **self._best_eval(),
        }
        return [Finding(step, "warning", "epoch_drop", title, evidence, *self.advice())]

    def _check_eval_rising(self, step: int) -> list[Finding]:
        if len(self.evals) < 3:
            return []
        (a, train_a), (b, _), (c, train_c) = [(e.loss, e.train) for e in self.evals[-3:]]
        train_falls = train_a is None or train_c is None or train_c < train_a
        best = min(e.loss for e in self.evals)
        rising = a < b < c and c > (1 + EVAL_RISE) * best and train_falls
        if not rising or not self.watch.open("overfitting", step):
            return []
        best = self._best_eval()
        title = (
            f"eval loss rose 2 evals in a row: {num(a)} -> {num(b)} -> {num(c)} at step {step} "
            f"(best {num(best['best_eval_loss'])} at step {best['best_eval_step']}) while train loss "
            f"fell to {num(train_c)}"
        )
        evidence = {"step": step, "eval_loss": c, "train_loss": train_c, **best}
        return [Finding(step, "warning", "overfitting", title, evidence, *self.advice())]

    def _check_gap(self, step: int) -> list[Finding]:
        if len(self.evals) < 2 or self.watch.fired("generalization_gap"):
            return []
        prev, now = self.evals[-2:]
        if prev.train is None or now.train is None:
            return []
        gap, prev_gap = now.loss - now.train, prev.loss - prev.train
        # Two standard errors of margin: per-step train losses are noisy.
        if gap <= GAP_LIMIT + 2 * now.train_se or gap <= prev_gap:
            return []
        title = (
            f"train-eval gap grew to {gap:.2f} at step {step} (was {prev_gap:.2f}; healthy is about "
            f"0.1-0.3): eval {num(now.loss)}, train {num(now.train)}"
        )
        evidence = {
            "step": step,
            "gap": gap,
            "previous_gap": prev_gap,
            "eval_loss": now.loss,
            "train_loss": now.train,
            **self._best_eval(),
        }
        return [Finding(step, "warning", "generalization_gap", title, evidence, *self.advice())]

    def _check_memorized(self, step: int) -> list[Finding]:
        eval_loss, train = self.evals[-1].loss, self.evals[-1].train
        memorized = train is not None and train < MEMORIZED_TRAIN and eval_loss > MEMORIZED_EVAL
        if not memorized or self.watch.fired("memorization"):
            return []
        title = (
            f"train loss {num(train)} while eval loss is {num(eval_loss)} at step {step}: the "
            "training set is memorized"
        )
        evidence = {"step": step, "train_loss": train, "eval_loss": eval_loss, **self._best_eval()}
        return [Finding(step, "warning", "memorization", title, evidence, *self.advice())]

    def advice(self) -> Advice:
        return overfit_advice(self.watch.method, self._best_eval().get("best_eval_epoch"))
