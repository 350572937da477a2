"""`tunewise.watch(trainer)`: the live doctor for a Trainer script people already have.

    import tunewise
    tunewise.watch(trainer)   # any transformers.Trainer or subclass (TRL's SFTTrainer too), before train()
    trainer.train()

It runs the same monitor as `tunewise train` (`training.monitor.StepMonitor` feeding the doctor's
`CurveWatcher`), so it sees every optimizer step, never applies a non-finite update, prints each finding
once as it happens with fixes spelled as TrainingArguments changes (`learning_rate=2.0e-05`), and writes a
run directory (default `<args.output_dir>/tunewise/`) that `tunewise doctor` and `tunewise report` read.
The directory says it was watched (`source: tunewise.watch` in config.yaml, plan.json and result.json),
so the doctor gives its fixes in the same words afterwards (one mapping: `tunewise.doctor.findings`).

How it attaches. The trainer is already built, so watch cannot give it another class; it changes the one
instance instead, by assigning attributes that shadow the class's methods (whatever the class is: Trainer,
SFTTrainer, or a user's subclass that overrides `training_step` or `compute_loss`):

- `trainer.training_step` becomes the instance's own `training_step` (the subclass's override included;
  `compute_loss` overrides run inside it) followed by `StepRecord.add`, which keeps the micro-batch's
  loss and token counts on the device;
- `trainer._get_grad_norm` becomes the Trainer's own followed by recording the pre-clip gradient norm
  it computes anyway (no extra compute);
- two callbacks are added: this module's `TrainerWatch` (learns the run's length at `on_train_begin`,
  writes config.yaml and plan.json) and the `StepMonitor`, which skips the update of a non-finite step
  by dropping the gradients at `on_pre_optimizer_step` (weights and optimizer state stay untouched, also
  under bf16 where no loss scaler does it) and stops the run;
- `trainer.train` becomes `TrainerWatch.train`: the trainer's own `train`, then result.json; with
  `on_divergence="recover"` it resumes from the last checkpoint saved before the loss went bad, with the
  next fix (learning rate / 10, then clipping, then warmup), as `tunewise train` does.

Under DDP every process watches (each must skip the same non-finite update); only the main process
writes the run directory and prints.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
import time
from dataclasses import fields
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

import yaml
from transformers import Trainer, TrainerCallback

from tunewise import rundir
from tunewise.doctor.advice import recovery_fixes
from tunewise.doctor.findings import WATCH_SOURCE, Finding, append_findings, speak_fix
from tunewise.doctor.watcher import CurveWatcher
from tunewise.training.callbacks import LearningRateReset
from tunewise.training.monitor import StepMonitor, StepRecord, trainer_precision
from tunewise.training.recovery import drop_checkpoints_after, restart_checkpoint

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)

RUN_SUBDIR = "tunewise"  # the default run directory, inside args.output_dir
# TrainingArguments fields config.yaml holds even at their defaults (the doctor reads them).
ALWAYS_RECORDED = frozenset(
    "learning_rate max_grad_norm warmup_steps max_steps num_train_epochs per_device_train_batch_size "
    "gradient_accumulation_steps lr_scheduler_type optim".split()
)


class WatchError(TypeError):
    """`watch` was given something it cannot watch; the message says what to pass instead."""


def watch(
    trainer: Trainer,
    *,
    run_dir: str | Path | None = None,
    on_divergence: Literal["stop", "recover"] = "stop",
    max_recoveries: int = 3,
    stream: TextIO | None = None,
) -> TrainerWatch:
    """Attach the live doctor to an already built Trainer; call it before `trainer.train()`.

    Args:
        trainer: a `transformers.Trainer` or any subclass (TRL's `SFTTrainer`, a user's own).
        run_dir: where metrics.jsonl, findings.jsonl, config.yaml, plan.json and result.json go;
            default `<args.output_dir>/tunewise`.
        on_divergence: "stop" ends the run at the first non-finite step (its update not applied);
            "recover" resumes from the last checkpoint before the loss went bad with the next fix
            (needs checkpoints: `save_strategy` other than "no").
        max_recoveries: attempts in recover mode.
        stream: where findings are printed (default stderr); only the main process prints.

    Returns:
        The `TrainerWatch`: after training, `.status`, `.findings`, `.diverged_at` and `.run_dir`.

    Raises:
        WatchError: `trainer` is not a transformers Trainer.
        ValueError: `on_divergence` is not "stop" or "recover", or "recover" without checkpoints.
    """
    if not isinstance(trainer, Trainer):
        raise WatchError(
            f"tunewise.watch() needs a transformers.Trainer (or a subclass such as trl.SFTTrainer), got "
            f"{type(trainer).__module__}.{type(trainer).__qualname__}; build the trainer first, e.g. "
            "`trainer = SFTTrainer(model=..., args=..., train_dataset=...)`, then `tunewise.watch(trainer)`"
        )
    if on_divergence not in ("stop", "recover"):
        raise ValueError(f"on_divergence={on_divergence!r} is not one of 'stop', 'recover'")
    if on_divergence == "recover" and _plain(trainer.args.save_strategy) == "no":
        raise ValueError(
            "on_divergence='recover' resumes from the last checkpoint saved before the loss went bad, but "
            "the trainer saves none (save_strategy='no'); set save_strategy='steps' and save_steps=50"
        )
    existing = getattr(trainer, "tunewise_watch", None)
    if existing is not None:
        return existing
    return TrainerWatch(trainer, run_dir, on_divergence, max_recoveries, stream or sys.stderr)


def speak_in_place(finding: Finding) -> Finding:
    """The monitor's rewrite hook: the finding's fixes in a Trainer script's words (`findings.speak_fix`).
    In place, so that the monitor's `divergence` and the printed and written findings all say the same."""
    finding.fixes = [speak_fix(f, "trainer") for f in finding.fixes]
    return finding


def render_finding(finding: Finding) -> str:
    """The lines printed when a finding happens: severity, step, title, and up to three ranked fixes."""
    where = f"step {finding.step}" if finding.step is not None else "the run"
    lines = [f"[tunewise] {finding.severity.upper()} at {where}: {finding.title}"]
    shown = [f for f in finding.fixes if f.change][:3] or finding.fixes[:1]
    for i, fix in enumerate(shown, 1):
        lines.append(
            f"[tunewise]   fix {i}: {fix.change}  ({fix.why})"
            if fix.change
            else f"[tunewise]   fix {i}: {fix.why}"
        )
    return "\n".join(lines)


def _method(model: Any) -> str:
    """lora / qlora / full, as the doctor's learning-rate bands know them."""
    if getattr(model, "peft_config", None):
        return "qlora" if getattr(model, "is_loaded_in_4bit", False) else "lora"
    return "full"


def _device_memory(args: TrainingArguments) -> int:
    """Bytes of the training device's memory: the GPU's, else the machine's RAM."""
    import torch

    if args.device.type == "cuda":
        return int(torch.cuda.get_device_properties(args.device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _plain(value: Any) -> Any:
    """A TrainingArguments value as YAML/JSON can hold it (enums as their value, objects as text)."""
    return json.loads(json.dumps(value.value if isinstance(value, Enum) else value, default=str))


def _arguments(args: TrainingArguments) -> dict[str, Any]:
    """The TrainingArguments fields set away from their defaults, and the ones the doctor reads."""
    out = {}
    for f in fields(args):
        value = getattr(args, f.name, None)
        default = f.default.value if isinstance(f.default, Enum) else f.default
        if f.name in ALWAYS_RECORDED or (
            f.init and _plain(value) != _plain(default) and f.name != "output_dir"
        ):
            out[f.name] = _plain(value)
    return out


def _plan(
    args: TrainingArguments, method: str, warmup: int, total: int, per_epoch: int | None, memory: int
) -> dict[str, Any]:
    """plan.json of a watched run: the steps and hardware the Trainer chose, in `tunewise plan`'s keys."""
    return {
        "source": WATCH_SOURCE,
        "method": method,
        "learning_rate": args.learning_rate,
        "warmup_steps": warmup,
        "steps": {
            "total_steps": total,
            "steps_per_epoch": per_epoch,
            "epochs": args.num_train_epochs,
            "effective_batch": args.train_batch_size * args.gradient_accumulation_steps * args.world_size,
        },
        "hardware": {
            "device": str(args.device),
            "precision": trainer_precision(args),
            "optim": _plain(args.optim),
            "memory_bytes": memory,
            "processes": args.world_size,
        },
    }


class TrainerWatch(TrainerCallback):
    """What `watch` attached to one trainer: the step recorder, the monitor, and the run directory.

    A TrainerCallback itself (it learns the run's length when training begins); `train` replaces the
    trainer's `train` (see the module docstring).
    """

    def __init__(
        self,
        trainer: Trainer,
        run_dir: str | Path | None,
        on_divergence: str,
        max_recoveries: int,
        stream: TextIO,
    ):
        self.trainer, self.on_divergence, self.max_recoveries, self.stream = (
            trainer,
            on_divergence,
            max_recoveries,
            stream,
        )
        self.run_dir = Path(run_dir) if run_dir is not None else Path(trainer.args.output_dir) / RUN_SUBDIR
        self.is_main = trainer.is_world_process_zero()
        self.findings: list[Finding] = []  # every attempt's
        self.recovery_changes: list[str] = []
        self.status: str | None = None  # completed | stopped | diverged | failed, once train() returned
        self.diverged_at: int | None = None
        self.error: str | None = None
        record = trainer.step_record = StepRecord()
        trainer.training_step = functools.partial(record.watch_step, trainer.training_step)
        trainer._get_grad_norm = functools.partial(record.watch_grad_norm, trainer._get_grad_norm)
        self._train = trainer.train
        trainer.train = self.train
        trainer.tunewise_watch = self
        trainer.add_callback(self)
        self.monitor = self._new_monitor()
        self._reset: LearningRateReset | None = None

    def _new_monitor(self) -> StepMonitor:
        """A StepMonitor for the next attempt; its CurveWatcher is made when training begins."""
        monitor = StepMonitor(
            self.trainer,
            self.run_dir if self.is_main else None,
            CurveWatcher(),
            on_finding=self._print,
            memory_limit=_device_memory(self.trainer.args),
            is_main=self.is_main,
            rewrite=speak_in_place,
        )
        self.trainer.add_callback(monitor)
        return monitor

    def _say(self, text: str) -> None:
        if self.is_main:
            self.stream.write(text + "\n")
            self.stream.flush()

    def _print(self, finding: Finding) -> None:
        self._say(render_finding(finding))

    # -- Trainer events
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        total = state.max_steps
        loader = kwargs.get("train_dataloader")
        try:
            per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps) if loader else None
        except TypeError:  # an iterable dataset has no length
            per_epoch = None
        warmup = args.get_warmup_steps(total)
        method = _method(self.trainer.model)
        self.monitor.watcher = CurveWatcher(
            method=method,
            learning_rate=args.learning_rate,
            max_grad_norm=args.max_grad_norm,
            warmup_steps=warmup,
            total_steps=total,
            steps_per_epoch=per_epoch,
            precision=trainer_precision(args),  # the overflow fixes depend on it
        )
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            config = {
                "source": WATCH_SOURCE,
                "model": {
                    "name": getattr(self.trainer.model, "name_or_path", None),
                    "method": method,
                    "precision": trainer_precision(args),
                },
                "training": _arguments(args),
                "doctor": {"on_divergence": self.on_divergence, "max_recoveries": self.max_recoveries},
            }
            (self.run_dir / rundir.CONFIG).write_text(
                yaml.safe_dump(config, sort_keys=False), encoding="utf-8"
            )
            plan = _plan(args, method, warmup, total, per_epoch, self.monitor.memory_limit)
            rundir.write_json(self.run_dir / rundir.PLAN, plan)

    # -- train()
    def train(self, *args: Any, **kwargs: Any) -> Any:
        """The trainer's own `train(...)`, watched; then result.json. In recover mode, a diverged attempt is
        resumed from the last good checkpoint with the next fix, up to `max_recoveries` times."""
        started = time.time()
        resume = kwargs.get("resume_from_checkpoint", args[0] if args else None)
        if self.is_main and not resume:
            self._clear()
        try:
            for attempt in range(self.max_recoveries + 1):
                output = self._train(*args, **kwargs)
                self.findings += self.monitor.findings
                if self.monitor.diverged_at is None or self.on_divergence == "stop":
                    break
                checkpoint = self._recover(attempt) if attempt < self.max_recoveries else None
                if checkpoint is None:
                    break
                args, kwargs = (), {**kwargs, "resume_from_checkpoint": str(checkpoint)}
        except BaseException as exc:
            interrupted = isinstance(exc, KeyboardInterrupt)
            self.status = "stopped" if interrupted else "failed"
            self.error = "interrupted by the user (Ctrl-C)" if interrupted else f"{type(exc).__name__}: {exc}"
            self._write_result(started)
            raise
        self._conclude()
        self._write_result(started)
        return output

    def _clear(self) -> None:
        """A new run in the same directory starts fresh logs (a resumed one appends to them)."""
        for name in (rundir.METRICS, rundir.FINDINGS, rundir.RESULT):
            (self.run_dir / name).unlink(missing_ok=True)

    def _conclude(self) -> None:
        """Status and the one message that says why the run stopped."""
        monitor, step = self.monitor, self.trainer.state.global_step
        self.diverged_at = monitor.diverged_at
        if monitor.stop_reason is not None:
            self.status = "stopped"
            self.error = (
                f"{monitor.stop_reason.split(';')[0]}; training stopped: check how `labels` are "
                "built (the prompt mask, truncation by max_length)"
            )
        elif self.diverged_at is not None:
            self.status = "diverged"
            found = monitor.divergence
            what = found.title if found else f"the loss is not finite at step {self.diverged_at}"
            skipped = [s for s in monitor.skipped_steps if s <= self.diverged_at]
            fix = next((f.change for f in found.fixes if f.change), None) if found else None
            self.error = (
                f"{what}; training stopped"
                + (f"; the non-finite updates of {_steps(skipped)} were not applied" if skipped else "")
                + (f"; try {fix}" if fix else "")
            )
        else:
            self.status = "completed"
        if self.error:
            self._say(f"[tunewise] {self.status} at step {step}: {self.error}")

    def _recover(self, attempt: int) -> Path | None:
        """Roll back to the last checkpoint before the climb and apply the next fix (None: no checkpoint)."""
        args, monitor = self.trainer.args, self.monitor
        good = restart_checkpoint(Path(args.output_dir), monitor.trouble_began, foreign=True)
        if good is None:
            self._say(
                f"[tunewise] cannot recover: no checkpoint was saved before step {monitor.trouble_began}"
                "; save more often (a smaller save_steps)"
            )
            return None
        fixes = recovery_fixes(args.learning_rate, args.max_grad_norm)
        fix = speak_fix(fixes[min(attempt, len(fixes) - 1)], "trainer")
        if self.is_main:
            drop_checkpoints_after(Path(args.output_dir), good)  # never resume from weights that diverged
        _apply(args, fix.change)
        # A new scheduler is built from the changed arguments, then loaded from the checkpoint.
        self.trainer.lr_scheduler = None
        if self._reset is not None:
            self.trainer.remove_callback(self._reset)
        self._reset = LearningRateReset(args.learning_rate)
        self.trainer.add_callback(self._reset)
        self.trainer.remove_callback(monitor)
        self.recovery_changes.append(fix.change)
        finding = Finding(
            monitor.diverged_at,
            "info",
            "recovery",
            f"recovering: restarting from {good.name} with {fix.change}",
            {"diverged_at": monitor.diverged_at, "checkpoint": good.name},
            ["the run diverged"],
            [fix],
        )
        self.findings.append(finding)
        if self.is_main:
            append_findings(self.run_dir / rundir.FINDINGS, [finding])
        self._print(finding)
        self.monitor = self._new_monitor()
        return good

    def _write_result(self, started: float) -> None:
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        state = self.trainer.state
        window = max(int(self.trainer.args.logging_steps or 1), 1)
        losses = [r["loss"] for r in rundir.train_records(rundir.read_metrics(self.run_dir))][-window:]
        evals = [h["eval_loss"] for h in state.log_history if "eval_loss" in h]
        numbers = {
            "source": WATCH_SOURCE,
            "final_train_loss": sum(losses) / len(losses) if losses else None,
            "best_eval_loss": min(evals) if evals else None,
            "best_checkpoint": Path(state.best_model_checkpoint).name
            if state.best_model_checkpoint
            else None,
            "diverged_at": self.diverged_at,
            "recovery_changes": self.recovery_changes,
            "findings": [
                {"step": f.step, "severity": f.severity, "code": f.code, "title": f.title}
                for f in self.findings
                if f.severity != "info"
            ],
        }
        result = rundir.RunResult(
            self.run_dir, self.status or "failed", state.global_step, self.error, numbers
        )
        rundir.write_result(result, started)


def _steps(steps: list[int]) -> str:
    """`step 4` or `steps 2-4` (a run of consecutive steps) or `steps 2, 5`."""
    if len(steps) == 1:
        return f"step {steps[0]}"
    if steps == list(range(steps[0], steps[-1] + 1)):
        return f"steps {steps[0]}-{steps[-1]}"
    return "steps " + ", ".join(map(str, steps))


def _apply(args: TrainingArguments, change: str) -> None:
    """Apply `name=value` (a recovery fix) to the TrainingArguments the trainer reads."""
    name, value = change.split("=", 1)
    setattr(args, name, type(getattr(args, name))(float(value)))  # learning_rate, max_grad_norm, warmup_steps
    if name == "warmup_steps" and _plain(args.lr_scheduler_type) == "constant":
        args.lr_scheduler_type = "constant_with_warmup"  # "constant" ignores warmup
