"""The run: setup, train, save, record — one run directory per run, read top to bottom.

`train` prepares the data and the hardware choices, writes config.yaml, check.json and plan.json,
trains with the monitor watching every step (`_train_attempts`: once, or again from a good
checkpoint after a divergence in recover mode, see recovery.py), saves the adapter (or the model),
and writes result.json and the report. The run directory is the interface to `doctor`, `report`,
`eval` and `sweep`; its files are named in tunewise.rundir (docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import EarlyStoppingCallback, PrinterCallback, ProgressCallback, TrainingArguments, set_seed
from transformers.integrations import TensorBoardCallback

from tunewise import rundir
from tunewise.batching import (
    choose_batching,
    make_collator,
    record_choice,
    sampling_strategy,
)
from tunewise.config import Config
from tunewise.doctor.curve import load_curve
from tunewise.doctor.findings import Finding
from tunewise.doctor.watcher import CurveWatcher
from tunewise.errors import DoctorError
from tunewise.model import Hardware, load_model
from tunewise.plan import Prepared, plan_steps, prepare
from tunewise.report import write_report
from tunewise.rundir import RunResult
from tunewise.training.callbacks import DiskGuard, LearningRateReset, PauseAt, StopOnSignal
from tunewise.training.checkpoints import CrashSafeTrainer
from tunewise.training.cost import model_step_cost
from tunewise.training.distributed import is_main_process, world_size
from tunewise.training.monitor import StepMonitor, WatchedTrainer, trainer_precision
from tunewise.training.recovery import divergence_message, recover
from tunewise.training.samples import write_samples

logger = logging.getLogger(__name__)


@dataclass
class TrainHooks:
    """What the caller (the CLI) wants to hear about while training runs; all optional."""

    on_notice: Callable[[str], None] | None = None
    on_finding: Callable[[Finding], None] | None = None
    on_step: Callable[[dict], None] | None = None
    on_start: Callable[[dict], None] | None = None
    on_plan: Callable[[dict], None] | None = None  # the plan (steps, hardware, memory) before training
    stop_at_step: int | None = None  # pause after this step's eval and checkpoint (sweep rungs)
    samples: bool = True  # write samples.json at the end (sweep trials skip the slow generation)


@dataclass
class RunSetup:
    """What every attempt of a run is built from; recovery replaces `cfg` with the fixed config."""

    cfg: Config
    run_dir: Path
    prepared: Prepared  # hardware, tokenizer, data and plan, as `check` saw them
    hooks: TrainHooks


def train(
    cfg: Config,
    *,
    resume: bool = False,
    hooks: TrainHooks | None = None,
    run_dir: Path | None = None,
    force: bool = False,
    check: dict | None = None,
) -> RunResult:
    """Run one training: data, model, Trainer with the monitor; record everything in the run dir.

    `check` is the pre-flight checklist the caller ran (written to check.json); result.json and
    the HTML report are written at the end, whatever the status.
    """
    hooks = hooks or TrainHooks()
    run_dir = run_dir or rundir.make_run_dir(cfg)
    started = time.time()
    main = is_main_process()
    result = RunResult(run_dir=run_dir, status="failed")
    try:
        setup = _setup(cfg, run_dir, hooks, force, check)
        result = _train_attempts(setup, resume)
    except KeyboardInterrupt:
        result.status, result.error = "stopped", "interrupted by the user (Ctrl-C); resume with --resume"
    except Exception as exc:
        result.status, result.error = "failed", f"{type(exc).__name__}: {exc}"
        result.numbers["traceback"] = traceback.format_exc()
        if main:
            rundir.write_result(result, started)
            _write_report(run_dir)
        raise
    if main:
        rundir.write_result(result, started)
        _write_report(run_dir)
    return result


def _setup(cfg: Config, run_dir: Path, hooks: TrainHooks, force: bool, check: dict | None) -> RunSetup:
    """Hardware, tokenizer, data and plan; config.yaml, check.json and plan.json; the notices."""
    prepared = prepare(cfg, world_size(), keep_untrained=force)
    if is_main_process():
        (run_dir / rundir.CONFIG).write_text(cfg.to_yaml(), encoding="utf-8")
        if check is not None:
            rundir.write_json(run_dir / rundir.CHECK, check)
        rundir.write_json(run_dir / rundir.PLAN, prepared.plan)
        if hooks.on_plan:
            hooks.on_plan(prepared.plan)
        for note in [*cfg.notices, *prepared.hw.notes]:
            if hooks.on_notice:
                hooks.on_notice(note)
    return RunSetup(cfg, run_dir, prepared, hooks)


def _train_attempts(setup: RunSetup, resume: bool) -> RunResult:
    """Train; in recover mode, on divergence restart from the last good checkpoint with the next fix."""
    run_dir, hooks = setup.run_dir, setup.hooks
    changes: list[str] = []
    findings: list[Finding] = []  # every attempt's, summarised in result.json
    latest, skipped = rundir.resumable(run_dir) if resume else (None, [])
    for line in skipped:  # torn checkpoints: named, never resumed from
        logger.warning("%s: %s", run_dir, line)
        if hooks.on_notice and is_main_process():
            hooks.on_notice(f"resume: {line}")
    checkpoint = str(latest) if latest else None
    if latest is not None and is_main_process():  # the steps after it run again: one log line each
        rundir.drop_records_after(run_dir, rundir.checkpoint_step(latest))
    if resume and checkpoint is None:
        logger.info("no checkpoint in %s: starting from step 0", run_dir)
    doctor = setup.cfg.doctor
    for attempt in range(doctor.max_recoveries + 1):
        trainer, monitor = build_trainer(setup)
        history = restore_history(monitor.watcher, run_dir, checkpoint)
        if attempt == 0:  # on --resume: the findings of the steps before, for result.json
            findings += history
        if changes:
            trainer.add_callback(LearningRateReset(setup.cfg.training["learning_rate"]))
        if hooks.on_start and is_main_process():
            hooks.on_start({"max_steps": monitor.total_steps, "attempt": attempt})
        stopper = StopOnSignal()
        trainer.add_callback(stopper)
        trainer.add_callback(DiskGuard(run_dir, setup.cfg.model.method == "full"))
        trainer.train(resume_from_checkpoint=checkpoint)
        findings += monitor.findings
        summary = {"findings": [_headline(f) for f in findings if f.severity != "info"]}
        summary |= monitor.run_numbers()  # speed, and the memory estimate against the measured peak
        if stopper.received is not None:  # SIGINT/SIGTERM: the step finished and was checkpointed
            result = _finish(trainer, setup, "stopped", summary)
            result.error = (
                f"stopped by {stopper.received} at step {trainer.state.global_step} (checkpoint saved); "
                f"resume with: tunewise train {run_dir / rundir.CONFIG} --resume"
            )
            return result
        if monitor.stop_reason is not None:  # the doctor stopped a run with nothing to learn
            result = _finish(trainer, setup, "stopped", summary)
            result.error = monitor.stop_reason
            return result
        if monitor.diverged_at is None:
            paused = bool(hooks.stop_at_step) and trainer.state.global_step < trainer.args.max_steps
            extra: dict[str, Any] = {**summary, **({"recovery_changes": changes} if changes else {})}
            if paused:
                extra["paused_at"] = trainer.state.global_step
            return _finish(trainer, setup, "stopped" if paused else "completed", extra)
        if doctor.on_divergence != "recover" or attempt == doctor.max_recoveries:
            extra = {**summary, "diverged_at": monitor.diverged_at, "recovery_changes": changes}
            result = _finish(trainer, setup, "diverged", extra)
            result.error = divergence_message(setup.cfg, monitor.diverged_at, monitor.divergence, changes)
            return result
        recovery = recover(
            setup.cfg, run_dir, attempt, monitor.diverged_at, monitor.trouble_began, hooks.on_finding
        )
        checkpoint = str(recovery.checkpoint) if recovery.checkpoint else None
        setup = dataclasses.replace(setup, cfg=recovery.cfg)
        changes.append(recovery.fix.change)
        findings.append(recovery.finding)
    raise AssertionError("unreachable")


def restore_history(watcher: CurveWatcher, run_dir: Path, checkpoint: str | None) -> list[Finding]:
    """Replay the steps logged up to the checkpoint a run restarts from into the new attempt's watcher.

    Without it a resumed (or recovered) run starts a doctor that forgot everything: a healthy run
    resumed at step 300 would be called flat at step 350. The findings it raises again are in
    findings.jsonl already; they are returned, not written.
    """
    step = rundir.checkpoint_step(Path(checkpoint)) if checkpoint else None
    if not step or not (run_dir / rundir.METRICS).exists():
        return []
    try:
        curve = load_curve(run_dir / rundir.METRICS)
    except DoctorError as exc:  # a history the doctor cannot read never stops a resume
        logger.warning("the doctor starts without the history before step %d: %s", step, exc)
        return []
    return watcher.replay(curve, upto=step)


def build_trainer(setup: RunSetup) -> tuple[WatchedTrainer, StepMonitor]:
    """The model, the WatchedTrainer and its StepMonitor for one attempt."""
    cfg, run_dir, prepared = setup.cfg, setup.run_dir, setup.prepared
    hw, tokenizer, bundle = prepared.hw, prepared.tokenizer, prepared.bundle
    set_seed(int(cfg.training.get("seed", 42)))  # LoRA's initial weights too: same config, same run
    model = load_model(cfg, hw, tokenizer, prepared.pad_added)
    vocab_size = int(getattr(model.config, "vocab_size", 0) or 0) or None
    if is_main_process() and vocab_size:  # ln(vocab size) is the loss of a model that knows nothing
        plan = rundir.read_json_object(run_dir / rundir.PLAN)
        rundir.write_json(run_dir / rundir.PLAN, {**plan, "vocab_size": vocab_size})
    choice = choose_batching(model, cfg.data.batching)  # padding_free only where examples stay apart
    if is_main_process():
        record_choice(run_dir / rundir.PLAN, choice)
        if choice.notice() and setup.hooks.on_notice:
            setup.hooks.on_notice(choice.notice())
    has_eval = bool(bundle.validation)
    args = training_arguments(cfg, run_dir, hw, has_eval)
    trainer = CrashSafeTrainer(
        model=model,
        args=args,
        train_dataset=bundle.to_hf("train"),
        eval_dataset=bundle.to_hf("validation") if has_eval else None,
        data_collator=make_collator(choice, tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    plan = plan_steps(
        len(bundle.train),
        args.per_device_train_batch_size,
        args.gradient_accumulation_steps,
        args.num_train_epochs,
        args.max_steps,
        world_size(),
    )
    monitor = StepMonitor(
        trainer,
        run_dir,
        _watcher(cfg, args, plan.total_steps, plan.steps_per_epoch, vocab_size),
        on_finding=setup.hooks.on_finding,
        on_step=setup.hooks.on_step,
        memory_limit=hw.memory_bytes,
        is_main=is_main_process(),
        cost=model_step_cost(model, hw.device, hw.device_name, hw.precision),
        memory_estimate=(prepared.plan.get("memory") or {}).get("peak"),
        memory_estimate_step_1=(prepared.plan.get("memory") or {}).get("peak_step_1"),
        on_notice=setup.hooks.on_notice,
    )
    monitor.total_steps = plan.total_steps
    for callback in trainer.callback_handler.callbacks:  # events inside the run directory, no env var set
        if isinstance(callback, TensorBoardCallback):
            callback.logging_dir = str(run_dir / rundir.TENSORBOARD)
    trainer.add_callback(monitor)
    for noisy in (PrinterCallback, ProgressCallback):  # the monitor and the CLI report progress
        trainer.remove_callback(noisy)
    if setup.hooks.stop_at_step:
        trainer.add_callback(PauseAt(setup.hooks.stop_at_step))
    if cfg.doctor.early_stopping_patience and has_eval:
        trainer.add_callback(
            EarlyStoppingCallback(early_stopping_patience=cfg.doctor.early_stopping_patience)
        )
    return trainer, monitor


def training_arguments(cfg: Config, run_dir: Path, hw: Hardware, has_eval: bool) -> TrainingArguments:
    """TrainingArguments from the config, the run directory and the resolved hardware."""
    t = {**cfg.training, **hw.trainer_arguments()}
    t["disable_tqdm"] = True  # tunewise shows its own progress
    if sampling_strategy(cfg.data.batching):
        t["train_sampling_strategy"] = sampling_strategy(cfg.data.batching)
    if hw.device == "cpu":
        t.setdefault("dataloader_pin_memory", False)
        if world_size() > 1:
            t.setdefault("ddp_backend", "gloo")
    if not has_eval:
        t["eval_strategy"] = "no"
        t["load_best_model_at_end"] = False
    if t.get("gradient_checkpointing"):
        t.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})
    fields = set(TrainingArguments.__dataclass_fields__)
    for old, new in [
        ("gradient_checkpointing", "activation_checkpointing"),
        ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
    ]:
        if old in t and new in fields:  # this release renamed it; same meaning, no deprecation warning
            value = t.pop(old)
            t.setdefault(new, value)
    if world_size() > 1 and cfg.model.method != "full":
        t.setdefault("ddp_find_unused_parameters", False)
    t["remove_unused_columns"] = False
    # No compute_metrics: evaluation needs only the loss. Without this the Trainer keeps every eval
    # example's logits (examples x length x vocabulary floats: 2.5 GB for the demo's 100 x 128 x 49152).
    t.setdefault("prediction_loss_only", True)
    t.pop("logging_dir", None)  # the TensorBoard directory is the run's (see build_trainer)
    return TrainingArguments(output_dir=str(run_dir), **t)


def _watcher(
    cfg: Config, args: TrainingArguments, total_steps: int, steps_per_epoch: int, vocab_size: int | None
) -> CurveWatcher:
    warm = args.warmup_steps
    warmup = int(warm * total_steps) if 0 < warm < 1 else int(warm)
    return CurveWatcher(
        method=cfg.model.method,
        learning_rate=args.learning_rate,
        max_grad_norm=args.max_grad_norm,
        warmup_steps=warmup,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        vocab_size=vocab_size,
        precision=trainer_precision(args),
    )


def _finish(trainer: WatchedTrainer, setup: RunSetup, status: str, extra: dict) -> RunResult:
    """Save the final adapter/model, a few sample generations, and gather the final numbers."""
    cfg, run_dir, bundle = setup.cfg, setup.run_dir, setup.prepared.bundle
    state = trainer.state
    out = run_dir / (rundir.FULL_MODEL if cfg.model.method == "full" else rundir.ADAPTER)
    samples_error = None
    if is_main_process():
        trainer.save_model(str(out))
        trainer.processing_class.save_pretrained(str(out))
        examples = bundle.validation or bundle.train
        if status == "completed" and setup.hooks.samples and examples:
            try:
                write_samples(trainer.model, trainer.processing_class, examples, run_dir / rundir.SAMPLES)
            except Exception as exc:  # samples are a courtesy: a finished run never fails over them,
                samples_error = f"{type(exc).__name__}: {exc}"  # but result.json says why there are none
                logger.warning("could not write sample generations: %s", samples_error)
    window = max(int(cfg.training.get("logging_steps", 10)), 1)
    # The Trainer's definition of the final train loss: the mean over the last logging interval.
    losses = [r["loss"] for r in rundir.train_records(rundir.read_metrics(run_dir))][-window:]
    evals = [h["eval_loss"] for h in state.log_history if "eval_loss" in h]
    numbers = {
        "final_train_loss": sum(losses) / len(losses) if losses else None,
        "best_eval_loss": min(evals) if evals else None,
        "final_eval_loss": evals[-1] if evals else None,
        "best_checkpoint": Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None,
        "saved": out.name,
        **({"samples_error": samples_error} if samples_error else {}),
        **extra,
    }
    return RunResult(run_dir=run_dir, status=status, global_step=state.global_step, numbers=numbers)


def _headline(finding: Finding) -> dict[str, Any]:
    return {"step": finding.step, "severity": finding.severity, "code": finding.code, "title": finding.title}


def _write_report(run_dir: Path) -> None:
    """report.html and its PNGs; a report that cannot be drawn never fails the run."""
    try:
        write_report(run_dir)
    except Exception as exc:
        logger.warning("could not write the report for %s: %s", run_dir, exc)
