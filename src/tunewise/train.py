"""Train: setup, train, save, record — one run directory per run, read top to bottom.

The run directory (see DESIGN.md) is the interface to `doctor`, `report`, `eval` and `sweep`:
config.yaml, plan.json, check.json, metrics.jsonl, findings.jsonl, result.json, checkpoint-N/,
adapter/ (or model/ for full fine-tuning), tensorboard/.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tunewise.config import Config
from tunewise.findings import Finding, Fix, append_findings
from tunewise.watcher import CurveWatcher

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
class RunResult:
    """The outcome of `train`, also written to result.json."""

    run_dir: Path
    status: str
    global_step: int = 0
    error: str | None = None
    numbers: dict[str, Any] = field(default_factory=dict)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_run_dir(cfg: Config) -> Path:
    """runs/<name>/ — the name defaults to <method>-<time>."""
    name = cfg.name or f"{cfg.model.method}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    cfg.name = name
    run_dir = Path(cfg.output_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def latest_checkpoint(run_dir: Path, before: int | None = None) -> Path | None:
    """The checkpoint-N with the highest N (below `before` when given) that has a trainer_state.json."""
    found = []
    for path in run_dir.glob("checkpoint-*"):
        suffix = path.name.split("-", 1)[1]
        if suffix.isdigit() and (path / "trainer_state.json").is_file():
            if before is None or int(suffix) < before:
                found.append((int(suffix), path))
    return max(found)[1] if found else None


def training_arguments(cfg: Config, run_dir: Path, hw: Any, has_eval: bool) -> Any:
    """TrainingArguments from the config, the run directory and the resolved hardware."""
    from transformers import TrainingArguments

    t = dict(cfg.training)
    t["optim"] = hw.optim
    t["bf16"] = hw.precision == "bf16"
    t["fp16"] = hw.precision == "fp16"
    t["disable_tqdm"] = True  # tunewise shows its own progress
    if hw.device == "cpu":
        t["use_cpu"] = True
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
    t["logging_dir"] = str(run_dir / "tensorboard")
    args = TrainingArguments(output_dir=str(run_dir), **{k: v for k, v in t.items() if k != "logging_dir"})
    return args


def _watcher(cfg: Config, args: Any, total_steps: int, steps_per_epoch: int) -> CurveWatcher:
    warm = args.warmup_steps
    warmup = int(warm * total_steps) if 0 < warm < 1 else int(warm)
    return CurveWatcher(
        method=cfg.model.method,
        learning_rate=args.learning_rate,
        max_grad_norm=args.max_grad_norm,
        warmup_steps=warmup,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
    )


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- the run


def build_trainer(
    cfg: Config, run_dir: Path, hw: Any, tokenizer: Any, bundle: Any, pad_added: bool, hooks: TrainHooks
) -> tuple[Any, Any]:
    """The model, the WatchedTrainer and its StepMonitor for one attempt."""
    from transformers import EarlyStoppingCallback, PrinterCallback, ProgressCallback

    from tunewise.data import DataCollator
    from tunewise.model import load_model
    from tunewise.monitor import StepMonitor, WatchedTrainer
    from tunewise.plan import plan_steps

    model = load_model(cfg, hw, tokenizer, pad_added)
    has_eval = bool(bundle.validation)
    args = training_arguments(cfg, run_dir, hw, has_eval)
    # The TensorBoard callback reads the env var in this release; keep events inside the run directory.
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    trainer = WatchedTrainer(
        model=model,
        args=args,
        train_dataset=bundle.to_hf("train"),
        eval_dataset=bundle.to_hf("validation") if has_eval else None,
        data_collator=DataCollator(pad_token_id=tokenizer.pad_token_id),
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
        _watcher(cfg, args, plan.total_steps, plan.steps_per_epoch),
        on_finding=hooks.on_finding,
        on_step=hooks.on_step,
        memory_limit=hw.memory_bytes,
        is_main=is_main_process(),
    )
    monitor.total_steps = plan.total_steps
    trainer.add_callback(monitor)
    for noisy in (PrinterCallback, ProgressCallback):  # the monitor and the CLI report progress
        trainer.remove_callback(noisy)
    if hooks.stop_at_step:
        trainer.add_callback(_PauseAt(hooks.stop_at_step))
    if cfg.doctor.early_stopping_patience and has_eval:
        trainer.add_callback(
            EarlyStoppingCallback(early_stopping_patience=cfg.doctor.early_stopping_patience)
        )
    return trainer, monitor


def _recovery_fix(cfg: Config, attempt: int) -> Fix:
    """The next untried fix in the doctor's order: lr / 10, then clipping, then warmup."""
    t = cfg.training
    order = []
    order.append(
        Fix(change=f"training.learning_rate={t['learning_rate'] / 10:.3g}", why="learning rate / 10")
    )
    if not t.get("max_grad_norm") or t["max_grad_norm"] > 0.3:
        order.append(Fix(change="training.max_grad_norm=0.3", why="clip gradients at 0.3"))
    order.append(Fix(change="training.warmup_steps=100", why="warm up over 100 steps"))
    return order[min(attempt, len(order) - 1)]


def _apply_change(cfg: Config, change: str) -> Config:
    from tunewise.config import parse_override

    new = copy.deepcopy(cfg)
    (section, key), value = parse_override(change)
    new.training[key] = float(value) if key in ("learning_rate", "max_grad_norm") else value
    if key == "warmup_steps" and new.training.get("lr_scheduler_type") == "constant":
        new.training["lr_scheduler_type"] = "constant_with_warmup"  # "constant" ignores warmup
    return new


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

    `check` is the pre-flight checklist the caller ran (written to check.json); the HTML report is
    written at the end, whatever the status.
    """
    from tunewise.data import build_datasets, ensure_pad_token
    from tunewise.model import load_tokenizer, resolve_hardware

    hooks = hooks or TrainHooks()
    run_dir = run_dir or make_run_dir(cfg)
    started = time.time()
    main = is_main_process()
    result = RunResult(run_dir=run_dir, status="failed")
    try:
        hw = resolve_hardware(cfg)
        tokenizer = load_tokenizer(cfg)
        pad_added = ensure_pad_token(tokenizer)
        bundle = build_datasets(cfg.data, tokenizer, keep_untrained=force)
        if main:
            (run_dir / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
            if check is not None:
                write_json(run_dir / "check.json", check)
            plan = _write_plan(cfg, run_dir, hw, bundle)
            if hooks.on_plan:
                hooks.on_plan(plan)
        for note in [*cfg.notices, *hw.notes]:
            if hooks.on_notice and main:
                hooks.on_notice(note)
        result = _train_attempts(cfg, run_dir, hw, tokenizer, bundle, pad_added, hooks, resume)
    except KeyboardInterrupt:
        result.status, result.error = "stopped", "interrupted by the user (Ctrl-C); resume with --resume"
    except Exception as exc:
        result.status, result.error = "failed", f"{type(exc).__name__}: {exc}"
        result.numbers["traceback"] = traceback.format_exc()
        if main:
            _write_result(run_dir, result, started)
            _write_report(run_dir)
        raise
    if main:
        _write_result(run_dir, result, started)
        _write_report(run_dir)
    return result


def _write_report(run_dir: Path) -> None:
    """report.html and its PNGs; a report that cannot be drawn never fails the run."""
    from tunewise.report import write_report

    try:
        write_report(run_dir)
    except Exception as exc:
        logger.warning("could not write the report for %s: %s", run_dir, exc)


def _write_plan(cfg: Config, run_dir: Path, hw: Any, bundle: Any) -> dict:
    from tunewise.plan import plan_run

    plan = plan_run(
        cfg,
        len(bundle.train),
        len(bundle.validation or []),
        world_size(),
        hw=hw,
        longest=max((len(e.input_ids) for e in bundle.train), default=0),
    )
    plan["data"] = bundle.stats.to_dict()
    write_json(run_dir / "plan.json", plan)
    return plan


def _train_attempts(
    cfg: Config,
    run_dir: Path,
    hw: Any,
    tokenizer: Any,
    bundle: Any,
    pad_added: bool,
    hooks: TrainHooks,
    resume: bool,
) -> RunResult:
    """Train; in recover mode, on divergence reload the last good checkpoint with the next fix."""
    changes: list[str] = []
    findings: list[Finding] = []  # every attempt's, summarised in result.json
    checkpoint = str(latest_checkpoint(run_dir)) if resume and latest_checkpoint(run_dir) else None
    if resume and checkpoint is None:
        logger.info("no checkpoint in %s: starting from step 0", run_dir)
    for attempt in range(cfg.doctor.max_recoveries + 1):
        trainer, monitor = build_trainer(cfg, run_dir, hw, tokenizer, bundle, pad_added, hooks)
        if changes:
            trainer.add_callback(_learning_rate_reset(cfg.training["learning_rate"]))
        if hooks.on_start and is_main_process():
            hooks.on_start({"max_steps": monitor.total_steps, "attempt": attempt})
        trainer.train(resume_from_checkpoint=checkpoint)
        findings += monitor.findings
        summary = {"findings": [_headline(f) for f in findings if f.severity != "info"]}
        if monitor.stop_reason is not None:  # the doctor stopped a run with nothing to learn
            result = _finish(trainer, cfg, run_dir, "stopped", summary, bundle)
            result.error = monitor.stop_reason
            return result
        if monitor.diverged_at is None:
            paused = bool(hooks.stop_at_step) and trainer.state.global_step < trainer.args.max_steps
            extra: dict[str, Any] = {**summary, **({"recovery_changes": changes} if changes else {})}
            if paused:
                extra["paused_at"] = trainer.state.global_step
            status = "stopped" if paused else "completed"
            return _finish(trainer, cfg, run_dir, status, extra, bundle if hooks.samples else None)
        if cfg.doctor.on_divergence != "recover" or attempt == cfg.doctor.max_recoveries:
            return _finish(
                trainer,
                cfg,
                run_dir,
                "diverged",
                {**summary, "diverged_at": monitor.diverged_at, "recovery_changes": changes},
            )
        fix = _recovery_fix(cfg, attempt)
        # Checkpoint N holds the weights that gave step N+1's loss: keep only those from before the climb.
        good = latest_checkpoint(run_dir, before=monitor.trouble_began - 1)
        checkpoint = str(good) if good else None
        _drop_checkpoints_after(run_dir, good)
        cfg = _apply_change(cfg, fix.change)
        changes.append(fix.change)
        findings.append(_record_recovery(run_dir, monitor.diverged_at, fix, good, hooks))
    raise AssertionError("unreachable")


def _headline(finding: Finding) -> dict[str, Any]:
    return {"step": finding.step, "severity": finding.severity, "code": finding.code, "title": finding.title}


def _drop_checkpoints_after(run_dir: Path, good: Path | None) -> None:
    """Remove the abandoned attempt's checkpoints after the one recovery restarts from (all, without one),
    so that a later recovery or `--resume` never restarts from the weights that diverged."""
    keep = int(good.name.split("-", 1)[1]) if good else 0
    for path in run_dir.glob("checkpoint-*"):
        suffix = path.name.split("-", 1)[1]
        if suffix.isdigit() and int(suffix) > keep and is_main_process():
            shutil.rmtree(path)


class _PauseAt:
    """Stop after step N has been evaluated and checkpointed, so `--resume` continues the same schedule."""

    def __new__(cls, step: int) -> Any:
        from transformers import TrainerCallback

        class Pause(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if state.global_step == step and step < state.max_steps:
                    control.should_training_stop = True
                    control.should_evaluate = str(args.eval_strategy) not in ("no", "IntervalStrategy.NO")
                    control.should_save = True

        return Pause()


def _learning_rate_reset(learning_rate: float) -> Any:
    """A callback that, after resuming a checkpoint, applies the recovered run's new peak learning rate."""
    from transformers import TrainerCallback

    class LearningRateReset(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            sched, opt = kwargs.get("lr_scheduler"), kwargs.get("optimizer")
            if sched is None or opt is None:
                return
            sched.base_lrs = [learning_rate for _ in sched.base_lrs]
            for group, fn in zip(opt.param_groups, getattr(sched, "lr_lambdas", []), strict=False):
                group["initial_lr"] = learning_rate
                group["lr"] = learning_rate * fn(sched.last_epoch)
            sched._last_lr = [group["lr"] for group in opt.param_groups]  # what get_last_lr() reports

    return LearningRateReset()


def _record_recovery(run_dir: Path, step: int, fix: Fix, good: Path | None, hooks: TrainHooks) -> Finding:
    where = (f"from {good.name}" if good
             else "from the initial weights (no checkpoint from before the loss went bad)")
    finding = Finding(
        step=step,
        severity="info",
        code="recovery",
        title=f"recovering: restarting {where} with {fix.change}",
        evidence={"diverged_at": step, "checkpoint": good.name if good else None},
        causes=["the run diverged"],
        fixes=[fix],
    )
    if is_main_process():
        append_findings(run_dir / "findings.jsonl", [finding])
        if hooks.on_finding:
            hooks.on_finding(finding)
    return finding


def _split_prompt(example: Any) -> tuple[list[int], list[int]]:
    """(prompt ids, reference ids): everything before the last trained span, and that span."""
    labels = example.labels
    end = max(i for i, label in enumerate(labels) if label != -100) + 1
    start = end
    while start > 0 and labels[start - 1] != -100:
        start -= 1
    return example.input_ids[:start], example.input_ids[start:end]


def write_samples(model: Any, tokenizer: Any, examples: list[Any], path: Path, n: int = 3) -> None:
    """Greedy generations for a few validation prompts, base (adapter disabled) vs tuned: samples.json."""
    import contextlib

    import torch

    samples = []
    model.eval()
    for example in [e for e in examples if e.n_trained][:n]:
        prompt, reference = _split_prompt(example)
        ids = torch.tensor([prompt], device=model.device)
        row = {"prompt": tokenizer.decode(prompt),
               "reference": tokenizer.decode(reference, skip_special_tokens=True)}
        for which in ("base", "tuned"):
            disable = getattr(model, "disable_adapter", None)
            if which == "base" and disable is None:
                continue  # full fine-tuning: the base weights are gone from this model
            ctx = disable() if which == "base" else contextlib.nullcontext()
            with ctx, torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=len(reference) + 16, pad_token_id=tokenizer.pad_token_id)
            row[which] = tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True).strip()
        samples.append(row)
    path.write_text(json.dumps(samples, indent=2) + "\n", encoding="utf-8")


def _finish(trainer: Any, cfg: Config, run_dir: Path, status: str, extra: dict,
            bundle: Any = None) -> RunResult:
    """Save the final adapter/model, a few sample generations, and gather the final numbers."""
    state = trainer.state
    out = run_dir / ("model" if cfg.model.method == "full" else "adapter")
    if is_main_process():
        trainer.save_model(str(out))
        trainer.processing_class.save_pretrained(str(out))
        examples = (bundle.validation or bundle.train) if bundle is not None else []
        if examples and status == "completed":
            try:
                write_samples(trainer.model, trainer.processing_class, examples, run_dir / "samples.json")
            except Exception as exc:  # samples are a courtesy: never fail a finished run over them
                logger.warning("could not write sample generations: %s", exc)
    window = max(int(cfg.training.get("logging_steps", 10)), 1)
    losses = [r["loss"] for r in _train_records(run_dir)][-window:]  # the Trainer's definition: last interval
    evals = [h["eval_loss"] for h in state.log_history if "eval_loss" in h]
    numbers = {
        "final_train_loss": sum(losses) / len(losses) if losses else None,
        "best_eval_loss": min(evals) if evals else None,
        "final_eval_loss": evals[-1] if evals else None,
        "best_checkpoint": Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None,
        "saved": out.name,
        **extra,
    }
    return RunResult(run_dir=run_dir, status=status, global_step=state.global_step, numbers=numbers)


def _train_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("type") == "train"]


def _write_result(run_dir: Path, result: RunResult, started: float) -> None:
    data = {
        "status": result.status,
        "error": result.error,
        "global_step": result.global_step,
        "started": datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started, 2),
        "run_dir": str(run_dir),
        **result.numbers,
    }
    write_json(run_dir / "result.json", data)
