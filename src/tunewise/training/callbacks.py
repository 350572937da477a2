"""The small TrainerCallbacks of a run: pause at a step, reset the learning rate after a recovery,
record the learning-rate range test, stop cleanly on SIGINT/SIGTERM, and check the disk before the
first step. (The monitor, the biggest callback, is in monitor.py.)"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tunewise.errors import ConfigError
from tunewise.training.checkpoints import checkpoint_bytes, room_problem


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


class StopOnSignal(TrainerCallback):
    """Ctrl-C (SIGINT) or SIGTERM: finish the current step, save a checkpoint, stop cleanly.

    Cluster schedulers send SIGTERM before they kill a job. A second signal stops at once, as
    Python's default would. The handlers are installed for the run and restored after it.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: str | None = None  # the signal's name once one came
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # asked twice: do not wait for the step
            self.restore()
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        """Put back the handlers that were there before the run."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.restore()


class DiskGuard(TrainerCallback):
    """Before the first step: the run directory is writable and has room for the checkpoints it keeps.

    The size of one checkpoint comes from the model the Trainer holds (trainable weights, or all for
    full fine-tuning, plus Adam's two states per trainable weight); refuses with the numbers.
    """

    def __init__(self, run_dir: Path, full: bool) -> None:
        self.run_dir, self.full = run_dir, full

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs.get("model")
        strategy = str(getattr(args.save_strategy, "value", args.save_strategy))
        if model is None or not args.should_save or strategy == "no":
            return
        every = args.save_steps if args.save_steps >= 1 else args.save_steps * state.max_steps
        saves = max(1, int(state.max_steps // max(every, 1)) + 1) if strategy == "steps" else 1
        kept = min(args.save_total_limit or saves, saves)
        problem = room_problem(self.run_dir, checkpoint_bytes(model, self.full), kept)
        if problem:
            raise ConfigError([f"`output_dir`: {problem}"])
