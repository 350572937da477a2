"""The curve reader: training logs as a `Curve` (metrics.jsonl, Trainer output, TensorBoard events).

`load_curve` takes a run directory, a Trainer output_dir (trainer_state.json or checkpoint-*/), a
trainer_state.json file, a metrics.jsonl file or TensorBoard event files, and copes with what real logs
hold: NaN written as `NaN`/`Infinity`, resumed runs that log the same steps twice (the abandoned attempt
is dropped), a writer cut off mid-line. `read_context` reads the facts a tunewise run recorded about
itself (method, learning rate, warmup, status). No torch or transformers here.
"""

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunewise import rundir
from tunewise.doctor import tool_logs
from tunewise.doctor.findings import run_vocabulary
from tunewise.errors import DoctorError

logger = logging.getLogger(__name__)

EXPECTED = (
    "expected a tunewise run directory (metrics.jsonl), a Trainer output_dir (trainer_state.json "
    "or checkpoint-*/trainer_state.json), a trainer_state.json file, a LLaMA-Factory trainer_log.jsonl, "
    "an Axolotl output_dir (checkpoints or a model card with training results) or TensorBoard event files"
)

PRECISIONS = ("bf16", "fp16", "fp32")


@dataclass
class TrainPoint:
    """One optimizer step's (or one logging step's) training numbers."""

    step: int
    loss: float
    grad_norm: float | None = None
    lr: float | None = None
    epoch: float | None = None
    trainable_tokens: int | None = None


@dataclass
class EvalPoint:
    """One evaluation."""

    step: int
    eval_loss: float | None
    epoch: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # other eval_* numbers (accuracy, bleu, ...)


@dataclass
class Curve:
    """A run's logged points, one per step, sorted by step."""

    train: list[TrainPoint]
    eval: list[EvalPoint]
    source: str = ""
    checkpoints: list[int] = field(default_factory=list)  # saved checkpoint steps; empty when unknown
    best_model_checkpoint: str | None = None
    total_steps: int | None = None


def to_float(value: Any) -> float | None:
    """A logged number as a float (NaN and inf kept); None for a missing, boolean or non-numeric value."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def finite(x: float | None) -> bool:
    """A number that is neither None, NaN nor inf."""
    return x is not None and math.isfinite(x)


def hides_nan(loss: float, grad_norm: float | None) -> bool:
    """Trainer's logging_nan_inf_filter logs a NaN loss as 0.0; the grad norm still shows it."""
    return loss == 0.0 and grad_norm is not None and not math.isfinite(grad_norm)


def load_curve(path: Path) -> Curve:
    """Read a run's train/eval points from any supported log; raises DoctorError when there are none."""
    path = Path(path)
    if not path.exists():
        raise DoctorError(f"{path}: no such file or directory; {EXPECTED}")
    curve = _read_file(path) if path.is_file() else _read_dir(path)
    if not curve.train and not curve.eval:
        raise DoctorError(f"{curve.source}: no train loss or eval loss entries found; {EXPECTED}")
    return curve


def _read_file(path: Path) -> Curve:
    if path.name.startswith("events.out.tfevents"):
        return _read_tensorboard(path)
    if path.suffix == ".jsonl":
        return _read_llamafactory(path) if tool_logs.is_llamafactory_log(path) else _read_metrics_jsonl(path)
    if path.suffix == ".json":
        return _read_trainer_state(path)
    raise DoctorError(f"{path}: not a log the doctor reads; {EXPECTED}")


def _read_dir(path: Path) -> Curve:
    checkpoints = rundir.checkpoints(path)
    states = [checkpoints[s] / "trainer_state.json" for s in sorted(checkpoints)]
    states = [p for p in states if p.is_file()]
    if (path / rundir.METRICS).is_file():
        curve = _read_metrics_jsonl(path / rundir.METRICS)
    elif (path / "trainer_state.json").is_file():
        curve = _read_trainer_state(path / "trainer_state.json")
    elif states:
        curve = _read_trainer_state(states[-1])  # the newest checkpoint holds the whole history
    elif (path / tool_logs.LLAMAFACTORY_LOG).is_file():
        curve = _read_llamafactory(path / tool_logs.LLAMAFACTORY_LOG)
    elif events := sorted(path.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        curve = _read_tensorboard(events[-1].parent)  # the most recent run's directory
    elif records := tool_logs.results_table_records(path):
        where = f"{path / tool_logs.MODEL_CARD}: Training results"
        curve = _curve([_point(r, where, train="loss" in r) for r in records], path / tool_logs.MODEL_CARD)
    else:
        raise DoctorError(f"{path}: found no logs; {EXPECTED}")
    curve.checkpoints = sorted(checkpoints) or curve.checkpoints
    return curve


def _point(record: dict[str, Any], where: str, train: bool) -> TrainPoint | EvalPoint:
    """A train or eval point from one log record; DoctorError when its `step` is missing."""
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int | float) or not math.isfinite(step):
        raise DoctorError(f'{where}: entry has no numeric `step`; expected e.g. {{"step": 10, "loss": 2.3}}')
    if train:
        tokens = record.get("trained_tokens", record.get("trainable_tokens"))
        tokens = tokens if isinstance(tokens, int | float) and math.isfinite(tokens) else None
        return TrainPoint(
            int(step),
            to_float(record["loss"]),
            to_float(record.get("grad_norm")),
            to_float(record.get("learning_rate")),
            to_float(record.get("epoch")),
            None if tokens is None else int(tokens),
        )
    skip = {"eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}
    metrics = {
        k: float(v)
        for k, v in record.items()
        if k.startswith("eval_") and k not in skip and to_float(v) is not None
    }
    return EvalPoint(int(step), to_float(record.get("eval_loss")), to_float(record.get("epoch")), metrics)


def _curve(points: list[TrainPoint | EvalPoint], source: Path, **extra: Any) -> Curve:
    """Points in logged order -> Curve, keeping the last occurrence of each step.

    A step at or below one seen before means the run resumed from a checkpoint: what was logged
    after that step belongs to the abandoned attempt and is dropped.
    """
    train: dict[int, TrainPoint] = {}
    evals: dict[int, EvalPoint] = {}
    top = -1
    for p in points:
        is_train = isinstance(p, TrainPoint)
        if p.step <= top:
            # Step s logs its train loss, then its eval: an eval at s keeps the train loss at s.
            for kept, first_orphan in ((train, p.step + (not is_train)), (evals, p.step)):
                for s in [s for s in kept if s >= first_orphan]:
                    del kept[s]
        (train if is_train else evals)[p.step] = p
        top = p.step  # after dropping the orphans nothing later is left
    return Curve(
        [train[s] for s in sorted(train) if train[s].loss is not None],
        [evals[s] for s in sorted(evals)],
        str(source),
        **extra,
    )


def _read_metrics_jsonl(path: Path) -> Curve:
    points, lineno = [], 0
    try:
        for lineno, record in rundir.read_jsonl(path, strict=True):
            kind = record.get("type") or ("eval" if "eval_loss" in record else "train")
            if (kind == "train" and "loss" in record) or kind == "eval":
                points.append(_point(record, f"{path}:{lineno}", train=kind == "train"))
    except (ValueError, RecursionError) as exc:  # a line nested too deep, or a 5000-digit number
        raise DoctorError(
            f"{path}: the first line after line {lineno} cannot be read as JSON ({type(exc).__name__}); "
            "expected one JSON object per line"
        ) from None
    return _curve(points, path)


def _read_llamafactory(path: Path) -> Curve:
    try:
        records, total = tool_logs.llamafactory_records(path)
    except (ValueError, RecursionError) as exc:  # a line nested too deep, or a 5000-digit number
        raise DoctorError(
            f"{path}: a line cannot be read as JSON ({type(exc).__name__}); expected LLaMA-Factory's "
            "trainer_log.jsonl, one JSON object per line"
        ) from None
    points = [_point(record, where, train="loss" in record) for where, record in records]
    return _curve(points, path, total_steps=total)


def _read_trainer_state(path: Path) -> Curve:
    try:
        state = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as exc:
        raise DoctorError(
            f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
            "expected a Hugging Face trainer_state.json"
        ) from None
    except (ValueError, RecursionError) as exc:  # nested too deep, or a 5000-digit number
        raise DoctorError(
            f"{path}: cannot be read as JSON ({type(exc).__name__}: {str(exc)[:80]}); "
            "expected a Hugging Face trainer_state.json"
        ) from None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise DoctorError(f"{path}: no `log_history` list; expected a Hugging Face trainer_state.json")
    # Skip the final summary entry (train_runtime, train_loss and no loss): it is not a step. A train log
    # may carry train_runtime too (newer transformers with include_tokens_per_second write it in every
    # log, beside train_tokens_per_second): a record with a loss is a step.
    points = [
        _point(r, f"{path}: log_history[{i}]", train="loss" in r)
        for i, r in enumerate(history)
        if isinstance(r, dict)
        and ("loss" in r or ("train_runtime" not in r and any(k.startswith("eval_") for k in r)))
    ]
    max_steps = state.get("max_steps")
    return _curve(
        points,
        path,
        best_model_checkpoint=best if isinstance(best := state.get("best_model_checkpoint"), str) else None,
        total_steps=max_steps if isinstance(max_steps, int) and max_steps > 0 else None,
    )


def _read_tensorboard(path: Path) -> Curve:
    """Read a TensorBoard event file or directory (Trainer's tags: train/loss, eval/loss, ...)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Keep every point (0); the accumulator drops steps orphaned by a resume itself.
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags().get("scalars", []))

    def series(*names: str) -> dict[int, float]:
        name = next((n for n in names if n in tags), None)
        return {e.step: e.value for e in acc.Scalars(name)} if name else {}

    loss, grad, lr = series("train/loss", "loss"), series("train/grad_norm"), series("train/learning_rate")
    epoch, eval_loss = series("train/epoch", "epoch"), series("eval/loss", "eval_loss")
    train = [TrainPoint(s, v, grad.get(s), lr.get(s), epoch.get(s)) for s, v in sorted(loss.items())]
    evals = [EvalPoint(s, v, epoch.get(s)) for s, v in sorted(eval_loss.items())]
    return Curve(train, evals, str(path))


def run_precision(model: dict[str, Any], training: dict[str, Any], plan: dict[str, Any]) -> str | None:
    """bf16 | fp16 | fp32, as the run trained: plan.json's resolved hardware precision, else config.yaml's
    `model.precision` (not "auto"), else its TrainingArguments `bf16`/`fp16` switches; None when unknown."""
    hardware = plan.get("hardware") if isinstance(plan.get("hardware"), dict) else {}
    for value in (hardware.get("precision"), model.get("precision")):
        if value in PRECISIONS:
            return value
    if training.get("bf16") is True or training.get("fp16") is True:
        return "bf16" if training.get("bf16") is True else "fp16"
    return None


def read_context(run_dir: Path) -> dict[str, Any]:
    """Facts for ranking causes and judging the loss: a tunewise run's config.yaml, plan.json and
    result.json, else LLaMA-Factory's or Axolotl's records, and the model's vocab_size; the run's
    precision, and whose words its fixes are in (`findings.run_vocabulary`)."""
    config_path = run_dir / rundir.CONFIG
    text = config_path.read_text(encoding="utf-8", errors="replace") if config_path.is_file() else ""
    try:
        config = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{config_path}:{mark.line + 1}" if mark else str(config_path)
        raise DoctorError(f"{where}: not valid YAML; expected the run's resolved config") from None
    except (ValueError, RecursionError) as exc:  # nested too deep, or a 5000-digit number
        raise DoctorError(
            f"{config_path}: cannot be read ({type(exc).__name__}); expected the run's resolved config"
        ) from None
    config = config if isinstance(config, dict) else {}
    training = config.get("training") if isinstance(config.get("training"), dict) else {}
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    context: dict[str, Any] = {"method": model["method"] if isinstance(model.get("method"), str) else None}
    for key in ("learning_rate", "max_grad_norm", "warmup_steps", "max_steps"):
        if finite(to_float(training.get(key))):
            context[key] = to_float(training[key])
    if 0 < context.get("warmup_steps", 0) < 1:
        del context["warmup_steps"]  # a fraction of all steps (transformers 5); plan.json has the count
    elif "warmup_steps" in context:
        context["warmup_steps"] = int(context["warmup_steps"])
    if context.get("max_steps", 0) > 0:
        context["total_steps"] = int(context["max_steps"])
    plan = rundir.read_json_object(run_dir / rundir.PLAN)
    steps = plan.get("steps") if isinstance(plan.get("steps"), dict) else {}
    resolved = {
        "warmup_steps": plan.get("warmup_steps"),
        **{k: steps.get(k) for k in ("total_steps", "steps_per_epoch")},
    }
    context.update({k: v for k, v in resolved.items() if isinstance(v, int)})
    if isinstance(plan.get("vocab_size"), int):
        context["vocab_size"] = plan["vocab_size"]
    status = rundir.read_json_object(run_dir / rundir.RESULT).get("status")
    context["status"] = status if isinstance(status, str) else None
    context["precision"] = run_precision(model, training, plan)
    context["vocabulary"] = run_vocabulary(config, plan)
    # Other tools' records fill in what tunewise's own files did not say.
    for key, value in tool_logs.tool_context(run_dir).items():
        if context.get(key) is None:
            context[key] = value
    return context
