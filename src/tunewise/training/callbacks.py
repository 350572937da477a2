"""The small TrainerCallbacks of a run: pause at a step, reset the learning rate after a recovery, and
record the learning-rate range test. (The monitor, the biggest callback, is in monitor.py.)"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments


class PauseAt(TrainerCallback):
    """Stop after step N has been evaluated and checkpointed, so `--resume` continues the same schedule.

    Sweeps use it to stop every trial at a rung.
    """

    def __init__(self, step: int):
        self.step = step

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.global_step == self.step and self.step < state.max_steps:
            control.should_training_stop = True
            control.should_evaluate = str(args.eval_strategy) not in ("no", "IntervalStrategy.NO")
            control.should_save = True


class LearningRateReset(TrainerCallback):
    """After resuming a checkpoint, apply a recovered run's new peak learning rate.

    The checkpoint's scheduler holds the old peak; its lambdas (warmup, decay) are kept and
    rescaled to the new one.
    """

    def __init__(self, learning_rate: float):
        self.learning_rate = learning_rate

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        sched, opt = kwargs.get("lr_scheduler"), kwargs.get("optimizer")
        if sched is None or opt is None:
            return
        lr = self.learning_rate
        sched.base_lrs = [lr for _ in sched.base_lrs]
        for group, fn in zip(opt.param_groups, getattr(sched, "lr_lambdas", []), strict=False):
            group["initial_lr"] = lr
            group["lr"] = lr * fn(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in opt.param_groups]  # what get_last_lr() reports


class RangeRecorder(TrainerCallback):
    """lr-find: record (lr, loss) at every logged step; stop once `stop` gives a reason.

    Args:
        stop: (lrs, losses) -> why to stop after the last point, or None to go on.
    """

    def __init__(self, stop: Callable[[list[float], list[float]], str | None]) -> None:
        self.stop = stop
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.reason: str | None = None  # why it stopped the run, if it did

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs or "loss" not in logs or "learning_rate" not in logs:
            return
        self.lrs.append(float(logs["learning_rate"]))
        self.losses.append(float(logs["loss"]))
        why = self.stop(self.lrs, self.losses)
        if why and self.reason is None:
            self.reason = why
        if why:  # never clear the flag: the Trainer sets it at max_steps
            control.should_training_stop = True
