"""The live monitor: sees every optimizer step, records metrics.jsonl, guards updates, runs the doctor.

`WatchedTrainer` is transformers' Trainer with two small hooks that record what the Trainer computes
anyway (each micro-batch loss and the pre-clip gradient norm), so the monitor sees every optimizer step,
not only logging steps, at no extra compute. `StepMonitor` (a TrainerCallback) then:
  - skips the optimizer update of a step whose loss or gradient norm is not finite (drops the gradients,
    so the optimizer leaves weights and moments untouched: with bf16 there is no loss scaler to do it);
  - writes one metrics.jsonl line per optimizer step and per evaluation (NaN stays NaN);
  - feeds the doctor's CurveWatcher (tunewise.doctor) and writes its findings to findings.jsonl at once;
  - stops the run at the step the doctor finds a divergence (`diverged_at`, `divergence`): a non-finite
    step, or any error whose code counts toward the "diverged" verdict (tunewise.doctor.codes: an
    explosion is a divergence whether or not it is NaN); or when the doctor finds that batches train no
    token at all (`stop_reason`: a NaN loss from 0/0 is nothing to learn, not a divergence); under DDP
    the loss judged is the mean over the processes and the stop is agreed, so every process stops at
    the same step (none is left waiting in the next all-reduce; tunewise.training.distributed);
  - runs the doctor's end-of-run checks when training ends; `findings` holds everything it found.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import math
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tunewise import rundir
from tunewise.batching import batch_counts
from tunewise.doctor.codes import DIVERGED_CODES
from tunewise.doctor.findings import Finding, append_findings
from tunewise.doctor.memory import check_memory
from tunewise.doctor.watcher import CurveWatcher
from tunewise.training.cost import StepCost
from tunewise.training.distributed import agree_on_max, mean_over_processes

logger = logging.getLogger(__name__)
MEMORY_ESTIMATE_TOLERANCE = 0.25  # plan's estimate vs the measured peak: a larger error is reported as a bug
# What a process decided at a step, agreed over the processes as the largest (a divergence wins).
GO_ON, STOP_UNTRAINED, STOP_DIVERGED = 0, 1, 2


class StepRecord:
    """What one optimizer step did, filled by WatchedTrainer's hooks.

    Micro-batch sums stay on the batch's device; `settle` copies them to the host once per optimizer step,
    so the monitor adds no device sync per micro-batch.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._settled = False
        self.micro = 0
        self.loss = 0.0
        self.tokens = 0  # real tokens, padding not counted
        self.positions = 0  # positions computed, padding included
        self.attention_pairs = 0  # causal attention pairs, for the attention FLOPs
        self.trained_tokens: int | None = None  # None when the batches carry no labels
        self.grad_norm: float | None = None
        self.learning_rate: float | None = None

    def add(self, loss: torch.Tensor, inputs: dict[str, Any]) -> None:
        parts = {"loss": loss.detach().float(), **batch_counts(inputs)}  # padded or packed rows alike
        for key, value in parts.items():
            self._sums[key] = self._sums[key] + value if key in self._sums else value
        self.micro += 1
        self._settled = False

    def watch_step(
        self,
        training_step: Callable[..., torch.Tensor],
        model: torch.nn.Module,
        inputs: dict[str, Any],
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Run a micro-batch's `training_step` (the Trainer's or an override); record loss and tokens."""
        counted = ("input_ids", "attention_mask", "position_ids", "labels")
        kept = {k: inputs[k] for k in counted if k in inputs}  # before any pop
        loss = training_step(model, inputs, *args, **kwargs)
        self.add(loss, kept)
        return loss

    def watch_grad_norm(
        self, get_grad_norm: Callable[..., Any], model: torch.nn.Module, grad_norm: Any = None
    ) -> Any:
        """Run the Trainer's `_get_grad_norm` and record the pre-clip gradient norm it returns."""
        norm = get_grad_norm(model, grad_norm=grad_norm)
        self.grad_norm = float(norm) if norm is not None else None
        return norm

    def settle(self) -> None:
        """Copy the step's sums to the host (idempotent until the next micro-batch)."""
        if self._settled:
            return
        if "loss" in self._sums:  # the mean over the processes: every process judges the same number
            self.loss = float(mean_over_processes(self._sums["loss"]))
        self.tokens = int(self._sums["tokens"]) if "tokens" in self._sums else 0
        self.positions = int(self._sums["positions"]) if "positions" in self._sums else 0
        self.attention_pairs = int(self._sums["attention_pairs"]) if "attention_pairs" in self._sums else 0
        self.trained_tokens = int(self._sums["trained_tokens"]) if "trained_tokens" in self._sums else None
        self._settled = True


class WatchedTrainer(Trainer):
    """Trainer that records each micro-batch's loss and tokens and each step's pre-clip gradient norm."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step_record = StepRecord()

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        return self.step_record.watch_step(super().training_step, model, inputs, num_items_in_batch)

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        return self.step_record.watch_grad_norm(super()._get_grad_norm, model, grad_norm)


def trainer_precision(args: TrainingArguments) -> str:
    """bf16 | fp16 | fp32: the mixed precision the Trainer trains in (the overflow fixes depend on it)."""
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _divergences(findings: list[Finding]) -> list[Finding]:
    """The errors among `findings` whose code counts toward the "diverged" verdict."""
    return [f for f in findings if f.severity == "error" and f.code in DIVERGED_CODES]


def _padding(tokens: float, positions: float) -> float | None:
    return round(1 - tokens / positions, 4) if positions else None


def _rate(count: float | None, seconds: float) -> float | None:
    return count / seconds if count is not None and seconds > 0 else None


PROC_STATUS, PROC_CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak_memory() -> None:
    """Start the peak over from now, so that a run's peak is its own: the demo evaluates the base model
    in the same process first, and that peak is not training's (Linux: "5" to clear_refs resets VmHWM)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    _give_back_freed_memory()
    try:
        PROC_CLEAR_REFS.write_text("5")
    except OSError:  # not Linux, or not allowed: the peak stays the process's
        pass


def _give_back_freed_memory() -> None:
    """Return what earlier work freed to the OS (glibc's malloc_trim), so the resident set a reset starts
    from is what is live, not what the base model's evaluation once held."""
    gc.collect()
    _malloc_trim()


def _malloc_trim() -> bool:
    """glibc's malloc_trim(0): hand the heap's free pages back to the OS; False where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the resident set keeps what it has
        return False
    return True


class FreedMemory:
    """Gives the CPU heap's free pages back to the OS when the resident set has grown past step 1's.

    On the CPU glibc keeps the blocks a step frees for later requests of their size; padding-free batches
    change shape every step, so the resident set grew step after step past what was live (the demo: 2.15
    GiB at step 1, 2.66 by step 12, 1.1 GiB live between steps), and the plan's estimate, which counts what
    is live, was 20-30% under the run's peak. A trim is not free: the pages it returns are faulted back in
    by the next step (trimming after every step made the bundled benchmark's 1.7 s steps 25-40% slower). So
    the first call after step 1 takes the resident set as the baseline, and a later call trims only when
    the set is more than GROWTH over it (every few steps on the demo), and never while it is under the
    plan's estimate of the training peak (`floor`): that much the plan promised, and trimming it only costs
    time. On the speed benchmark's varied set step 1 is a short one, so every later step was past the line
    and trimmed (0.06-0.13 s a step plus the faults after); its estimate is for rows of the longest example,
    which no step reached. After a trim that took t seconds, the next waits until 20 t have passed. Nothing
    is done on a GPU (its allocator's cache is not the RSS).
    """

    GROWTH = 0.10

    def __init__(self, floor: int | None = None) -> None:
        self.enabled = not torch.cuda.is_available()  # as peak_memory_bytes: RSS is measured on the CPU
        self.floor = floor or 0
        self.baseline: int | None = None
        self.next_at = 0.0
        self.trims = 0

    def give_back(self) -> None:
        """Trim if the resident set is past GROWTH over the baseline and the floor, unless one just ran."""
        if not self.enabled:
            return
        rss = resident_bytes()
        if self.baseline is None or rss is None:
            self.baseline = rss
            return
        if rss <= max((1 + self.GROWTH) * self.baseline, self.floor) or time.perf_counter() < self.next_at:
            return
        started = time.perf_counter()
        self.enabled = _malloc_trim()
        self.trims += 1
        self.next_at = time.perf_counter() + 20 * (time.perf_counter() - started)


def _status_bytes(key: str) -> int | None:
    """A size from Linux's /proc/self/status (`VmRSS`, `VmHWM`) in bytes; None where it does not say."""
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def resident_bytes() -> int | None:
    """The process's resident set now; None where /proc does not say."""
    return _status_bytes("VmRSS")


def peak_memory_bytes() -> int:
    """Peak memory since the last reset: GPU memory allocated on CUDA, resident set size on the CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class StepMonitor(TrainerCallback):
    """Records every optimizer step, skips non-finite updates, and runs the doctor live."""

    def __init__(
        self,
        trainer: WatchedTrainer,
        run_dir: Path | None,
        watcher: CurveWatcher,
        on_finding: Callable[[Finding], None] | None = None,
        on_step: Callable[[dict], None] | None = None,
        memory_limit: int = 0,
        is_main: bool = True,
        rewrite: Callable[[Finding], Finding] | None = None,  # e.g. tunewise.watch: fixes in a script's words
        cost: StepCost | None = None,  # FLOPs per token and the device's peak, for the MFU
        memory_estimate: int | None = None,  # the plan's peak over the run, compared with the measured one
        memory_estimate_step_1: int | None = None,  # the plan's training peak at step 1, recorded beside it
        on_notice: Callable[[str], None] | None = None,
    ):
        self.trainer, self.run_dir, self.watcher = trainer, run_dir, watcher
        self.on_finding, self.on_step, self.memory_limit, self.is_main = (
            on_finding,
            on_step,
            memory_limit,
            is_main,
        )
        self.rewrite = rewrite
        self.findings: list[Finding] = []
        self.diverged_at: int | None = None
        self.divergence: Finding | None = None  # the error that stopped the run as diverged
        self.stop_reason: str | None = None  # why the monitor stopped a run that did not diverge
        self.skipped_steps: list[int] = []
        self.last_step_time = self.start = time.time()
        self.tokens_total = 0
        self.cost, self.memory_estimate, self.on_notice = cost, memory_estimate, on_notice
        self.memory_estimate_step_1 = memory_estimate_step_1
        self.totals: dict[str, float] = {}  # over the steps after the first (warm-up), for result.json
        self.memory_step_1: int | None = None
        self.freed = FreedMemory(floor=memory_estimate)

    @property
    def trouble_began(self) -> int | None:
        """The step where the climb to the divergence began (the divergence step when it came at once)."""
        return None if self.diverged_at is None else self.watcher.trouble_began(self.diverged_at)

    # -- writing
    def _write(self, record: dict) -> None:
        if self.run_dir is not None and self.is_main:
            rundir.append_jsonl(self.run_dir / rundir.METRICS, [record])

    def _emit(self, findings: list[Finding]) -> None:
        for finding in findings:
            finding = self.rewrite(finding) if self.rewrite else finding
            self.findings.append(finding)
            if self.run_dir is not None and self.is_main:
                append_findings(self.run_dir / rundir.FINDINGS, [finding])
            if self.on_finding is not None and self.is_main:
                self.on_finding(finding)

    # -- what the run's steps cost
    def _add_to_totals(self, record: dict) -> None:
        """Add a step to the run's totals; the first step of an attempt (allocation, warm-up) is left out."""
        self.totals["seen"] = self.totals.get("seen", 0) + 1
        if self.totals["seen"] == 1:
            return
        flops = self.cost.step_flops(record["tokens"], record["attention_pairs"]) if self.cost else 0.0
        parts = {"steps": 1, "seconds": record["step_time"], "tokens": record["tokens"], "flops": flops}
        parts |= {"positions": record["positions"], "trained_tokens": record["trained_tokens"] or 0}
        for key, value in parts.items():
            self.totals[key] = self.totals.get(key, 0) + value

    def run_numbers(self) -> dict[str, Any]:
        """Speed and memory of the run for result.json; a memory estimate off by > 25% is also a notice."""
        t, seconds = self.totals, self.totals.get("seconds", 0.0)
        peak = self.cost.peak_flops if self.cost else None
        speed = {
            "steps_timed": int(t.get("steps", 0)),
            "trained_tokens_per_s": _rate(t.get("trained_tokens"), seconds),
            "tokens_per_s": _rate(t.get("tokens"), seconds),
            "padding_fraction": _padding(t.get("tokens", 0), t.get("positions", 0)),
            "mfu": t["flops"] / seconds / peak if peak and seconds else None,
            "peak_flops": peak,
        }
        measured = peak_memory_bytes()
        estimate = self.memory_estimate
        error = round((measured - estimate) / estimate, 4) if estimate else None
        memory = {"estimated_peak": estimate, "measured_peak": measured, "error": error}
        memory["estimated_step_1"] = self.memory_estimate_step_1
        memory["measured_step_1"] = self.memory_step_1
        if error is not None and abs(error) > MEMORY_ESTIMATE_TOLERANCE:
            memory["warning"] = (
                f"memory: the plan estimated {estimate / 2**30:.2f} GiB, the run peaked at "
                f"{measured / 2**30:.2f} GiB ({error:+.0%}); the estimate is wrong: please report it as a bug"
            )
            if self.on_notice is not None and self.is_main:
                self.on_notice(memory["warning"])
        return {"speed": speed, "memory": memory}

    # -- Trainer events
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.last_step_time = time.time()
        self.trainer.step_record.reset()
        reset_peak_memory()  # the plan estimates training's peak: measure training's, not the process's

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        rec = self.trainer.step_record
        rec.settle()
        if kwargs.get("optimizer") is not None:
            rec.learning_rate = kwargs["optimizer"].param_groups[0]["lr"]  # the rate this update uses
        loss = float(rec.loss)
        if not (_finite(loss) and (rec.grad_norm is None or _finite(rec.grad_norm))):
            # Drop the gradients: optimizers skip parameters whose grad is None, so this step changes nothing.
            for p in kwargs["model"].parameters():
                p.grad = None
            self.skipped_steps.append(state.global_step + 1)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        rec = self.trainer.step_record
        rec.settle()
        self.freed.give_back()  # before the next step allocates: what this one freed leaves the RSS
        now = time.time()
        step_time = now - self.last_step_time
        self.last_step_time = now
        self.tokens_total += rec.tokens
        lr = rec.learning_rate
        loss = float(rec.loss)
        record = {
            "type": "train",
            "step": state.global_step,
            "epoch": round(state.epoch or 0.0, 4),
            "loss": loss,
            "grad_norm": rec.grad_norm,
            "learning_rate": lr,
            "tokens": rec.tokens,
            "positions": rec.positions,
            "padding_fraction": _padding(rec.tokens, rec.positions),
            "trained_tokens": rec.trained_tokens,
            "attention_pairs": rec.attention_pairs,
            "tokens_total": self.tokens_total,
            "tokens_per_s": rec.tokens / step_time if step_time > 0 else None,
            "trained_tokens_per_s": _rate(rec.trained_tokens, step_time),
            "mfu": self.cost.mfu(rec.tokens, rec.attention_pairs, step_time) if self.cost else None,
            "step_time": round(step_time, 4),
            "time": round(now - self.start, 3),
        }
        record["memory_bytes"] = peak_memory_bytes()  # the peak so far: where a run's memory grows
        if state.global_step == 1:
            self.memory_step_1 = record["memory_bytes"]
        self._write(record)
        self._add_to_totals(record)
        new = self.watcher.observe_train(
            state.global_step, loss, rec.grad_norm, lr, state.epoch, trainable_tokens=rec.trained_tokens
        )
        self._emit(new)
        if state.global_step == 1 and self.memory_limit:
            self._emit(check_memory(record["memory_bytes"], self.memory_limit))
        finite = _finite(loss) and (rec.grad_norm is None or _finite(rec.grad_norm))
        # A NaN loss with trained tokens is a divergence; with none it is 0/0, no signal (the doctor decides
        # when to stop). A NaN grad norm alone had its update skipped: the doctor says whether it diverged.
        if (not _finite(loss) and rec.trained_tokens != 0) or _divergences(new):
            self._diverged(state.global_step, new, control)
        untrained = [f for f in new if f.code == "no_trainable_tokens" and f.severity == "error"]
        if untrained and self.stop_reason is None:
            self.stop_reason = (
                f"{untrained[0].title}; stopped (fix the labels: `tunewise inspect` shows "
                "which tokens are trained)"
            )
            control.should_training_stop = True
        self._agree_on_stop(state.global_step, control)
        if self.diverged_at == state.global_step:
            # The weights after a skipped update are still good; after an explosion they are not: no save.
            control.should_save = control.should_save or not finite
        if self.on_step is not None and self.is_main:
            self.on_step(record)
        rec.reset()

    def _diverged(self, step: int, new: list[Finding], control: TrainerControl) -> None:
        """Stop the run as diverged at `step` (the first divergence only)."""
        if self.diverged_at is not None:
            return
        found = _divergences(new)
        self.diverged_at, self.divergence = step, found[0] if found else None
        control.should_training_stop = True

    def _agree_on_stop(self, step: int, control: TrainerControl) -> None:
        """Under DDP, stop every process when one stops: the one that did not decide it takes the decision."""
        mine = (
            STOP_DIVERGED if self.diverged_at is not None else STOP_UNTRAINED if self.stop_reason else GO_ON
        )
        agreed = agree_on_max(mine)
        if agreed == mine:
            return
        if agreed == STOP_DIVERGED:
            self._diverged(step, [], control)
        else:
            self.stop_reason = "another process found batches that train no token; stopped"
        control.should_training_stop = True

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # End-of-run checks: a loss that stayed flat, a spike never over (a divergence at the last step).
        new = self.watcher.finish()
        self._emit(new)
        if _divergences(new):
            self._diverged(state.global_step, new, control)
        self._agree_on_stop(state.global_step, control)  # recover mode restarts on every process or none

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict | None = None,
        **kwargs: Any,
    ) -> None:
        metrics = metrics or {}
        self.freed.give_back()
        record = {
            "type": "eval",
            "step": state.global_step,
            "epoch": round(state.epoch or 0.0, 4),
            **{k: v for k, v in metrics.items() if isinstance(v, int | float)},
        }
        self._write(record)
        if "eval_loss" in metrics:
            self._emit(self.watcher.observe_eval(state.global_step, float(metrics["eval_loss"]), state.epoch))
