"""lr-find: the learning-rate range test, for the config's method, batch, precision and optimizer.

The learning rate grows exponentially (1e-7 to 1 by default) over at most ~100 optimizer steps from the
same initial adapter; the run stops once the smoothed loss passes 4x its minimum. The curve is smoothed
with a forward-backward EMA and read two ways: the valley rule (a tenth of the lr at the minimum: the
suggestion) and the steepest descent. A caution says when the curve gives no clear answer. Writes
lr_find.json and lr_find.png; the suggestion feeds `tunewise sweep --grid` as the centre of a grid.

Batches are made as the run makes them (`data.batching` through tunewise.batching: padding-free where the
model keeps packed examples apart), so the losses on the ramp are those of the run's batches; the choice is
recorded in lr_find.json's `batching`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch.optim.lr_scheduler import LambdaLR
from transformers import PrinterCallback, ProgressCallback, Trainer, set_seed

from tunewise import rundir
from tunewise.batching import BatchingChoice, choose_batching, make_collator
from tunewise.config import Config
from tunewise.data import build_datasets, ensure_pad_token
from tunewise.errors import ConfigError
from tunewise.model import load_model, load_tokenizer, resolve_hardware
from tunewise.training.callbacks import RangeRecorder
from tunewise.training.run import training_arguments

SMOOTHING = 0.9  # EMA factor, ~10 steps of memory (fastai's 0.98 remembers ~50: half of a 100-step ramp)
DIVERGE_FACTOR = 4.0
MAX_SUGGESTION = 0.1  # keeps the x2 grid point below 1, which the config refuses
LR_FIND_NOTE = (
    "learning-rate range tests are known to mislead on transformers and LoRA: the ramp is short, "
    "starts from one initialization, has no warmup, and Adam's early steps and small noisy "
    "batches move the curve; read lr_find.png and confirm with `tunewise sweep`"
)


@dataclass
class LRFindResult:
    """The range test's curve and what it suggests."""

    out_dir: Path
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    stop_reason: str
    minimum: float | None  # lr at the smoothed-loss minimum
    steepest: float | None  # lr where the smoothed loss falls fastest
    suggestion: float | None
    rule: str
    caution: str | None
    note: str = LR_FIND_NOTE
    batching: dict[str, Any] | None = None  # BatchingChoice.to_dict(): asked for, used, and why they differ

    def sweep_override(self) -> str | None:
        """`training.learning_rate=X` for `tunewise train`."""
        return f"training.learning_rate={self.suggestion:.2g}" if self.suggestion else None

    def sweep_grid(self) -> str | None:
        """A `--grid` item centered on the suggestion: x0.5, x1, x2."""
        if not self.suggestion:
            return None
        return "training.learning_rate=" + ",".join(f"{self.suggestion * m:.2g}" for m in (0.5, 1, 2))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            out_dir=str(self.out_dir), sweep_override=self.sweep_override(), sweep_grid=self.sweep_grid()
        )
        return data


def ema(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """Bias-corrected exponential moving average (causal: what the stop rule can see while running)."""
    avg, out = 0.0, []
    for i, loss in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta**i))
    return out


def smooth(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """The EMA run forward then backward: as smooth, without the EMA's lag toward higher rates.

    Points from the first non-finite loss on stay NaN.
    """
    n = next((i for i, x in enumerate(losses) if not math.isfinite(x)), len(losses))
    both = ema(ema(losses[:n], beta)[::-1], beta)[::-1]
    return both + [math.nan] * (len(losses) - n)


def suggest_lr(
    lrs: list[float], smoothed: list[float]
) -> tuple[float | None, float | None, float | None, str, str | None]:
    """(minimum, steepest, suggestion, rule, caution) from the smoothed curve.

    The suggestion is the lr at the smoothed minimum / 10 (the "valley" rule); the steepest descent of
    the smoothed loss over log(lr) is reported next to it. A caution says why the curve is unclear.
    """
    finite = [i for i, x in enumerate(smoothed) if math.isfinite(x)]
    if len(finite) < 5:
        return None, None, None, "none", "fewer than 5 finite points: lower --start or run more --steps"
    n = finite[-1] + 1
    loss = np.array(smoothed[:n])
    i_min = int(np.nanargmin(loss))
    minimum = lrs[i_min]
    slope = np.gradient(loss[: i_min + 1], np.log10(lrs[: i_min + 1])) if i_min >= 2 else None
    steepest = lrs[int(np.argmin(slope))] if slope is not None else None
    suggestion = min(max(minimum / 10, lrs[0]), lrs[n - 1], MAX_SUGGESTION)
    rule = (
        f"valley: a tenth of the lr at the smoothed-loss minimum ({minimum:.2g}); "
        f"steepest descent at {steepest:.2g}"
        if steepest
        else f"valley: a tenth of {minimum:.2g}"
    )
    problems = []
    if minimum / 10 > MAX_SUGGESTION:
        problems.append(
            f"the minimum / 10 is {minimum / 10:.2g}; capped at {MAX_SUGGESTION:g}, "
            "since Adam diverges above it"
        )
    drop = (loss[0] - loss[i_min]) / abs(loss[0]) if loss[0] else 0.0
    if drop < 0.05:
        problems.append(f"the smoothed loss fell only {drop:.1%} over the range")
    if i_min >= n - 2:
        problems.append("the loss was still falling at the end of the range (raise --end or --steps)")
    if i_min < max(3, n // 10):
        problems.append("the loss rose almost from the start (lower --start)")
    if steepest and not 1 / 10 <= steepest / suggestion <= 10:
        problems.append(f"the two rules disagree by {max(steepest / suggestion, suggestion / steepest):.0f}x")
    caution = "; ".join(problems) + f". {LR_FIND_NOTE}" if problems else None
    return minimum, steepest, suggestion, rule, caution


def stop_reason(lrs: list[float], losses: list[float]) -> str | None:
    """Why the range test stops after the last point: a non-finite loss, or the EMA past 4x its minimum."""
    running = ema(losses)
    best = min((x for x in running if math.isfinite(x)), default=math.inf)
    if not math.isfinite(running[-1]):
        return f"the loss became non-finite at lr {lrs[-1]:.2g}"
    if len(running) > 3 and running[-1] > DIVERGE_FACTOR * best:
        return f"the smoothed loss passed {DIVERGE_FACTOR:g}x its minimum at lr {lrs[-1]:.2g}"
    return None


def _range_trainer(cfg: Config, out_dir: Path, steps: int) -> tuple[Trainer, BatchingChoice]:
    """A Trainer over the tunewise model and data, with the config's batch, precision, optimizer and
    batching (chosen as `tunewise train` chooses it), and that batching choice."""
    cfg.training.update(
        max_steps=steps,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
        logging_steps=1,
        report_to="none",
        warmup_steps=0,
        lr_scheduler_type="constant",
    )
    hw = resolve_hardware(cfg)
    tokenizer = load_tokenizer(cfg)
    pad_added = ensure_pad_token(tokenizer)
    bundle = build_datasets(cfg.data, tokenizer)
    set_seed(int(cfg.training.get("seed", 42)))  # the same initial adapter every time
    model = load_model(cfg, hw, tokenizer, pad_added)
    choice = choose_batching(model, cfg.data.batching)  # padding_free only where examples stay apart
    trainer = Trainer(
        model=model,
        args=training_arguments(cfg, out_dir, hw, has_eval=False),
        train_dataset=bundle.to_hf("train"),
        data_collator=make_collator(choice, tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    for noisy in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(noisy)
    return trainer, choice


def find_learning_rate(
    cfg: Config, start: float = 1e-7, end: float = 1.0, steps: int = 100, out_dir: Path | None = None
) -> LRFindResult:
    """Learning-rate range test: lr grows exponentially from `start` to `end` over `steps` optimizer steps.

    Stops when the smoothed loss passes 4x its minimum. Writes lr_find.json and lr_find.png.

    Raises:
        ConfigError: a range that cannot work.
    """
    if not 0 < start < end or steps < 5:
        raise ConfigError(
            [
                f"lr-find needs 0 < --start < --end and --steps >= 5 "
                f"(got --start {start}, --end {end}, --steps {steps})"
            ]
        )
    cfg = copy.deepcopy(cfg)
    out_dir = out_dir or Path(cfg.output_dir) / (f"lr-find-{cfg.name}" if cfg.name else "lr-find")
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer, choice = _range_trainer(cfg, out_dir, steps)
    trainer.create_optimizer()
    for group in trainer.optimizer.param_groups:
        group["lr"] = 1.0  # LambdaLR multiplies this: the lambda is the learning rate itself
    ratio = end / start
    trainer.lr_scheduler = LambdaLR(
        trainer.optimizer, lambda i: start * ratio ** (min(i, steps - 1) / (steps - 1))
    )
    recorder = RangeRecorder(stop_reason)
    trainer.add_callback(recorder)
    trainer.train()
    lrs, losses = recorder.lrs, recorder.losses
    smoothed = smooth(losses)
    minimum, steepest, suggestion, rule, caution = suggest_lr(lrs, smoothed)
    why = recorder.reason or f"reached --end after {len(lrs)} steps"
    result = LRFindResult(
        out_dir,
        lrs,
        losses,
        smoothed,
        why,
        minimum,
        steepest,
        suggestion,
        rule,
        caution,
        batching=choice.to_dict(),
    )
    rundir.write_json(out_dir / "lr_find.json", result.to_dict())
    plot_lr_find(result, out_dir / "lr_find.png")
    return result


def plot_lr_find(result: LRFindResult, path: Path) -> None:
    """Smoothed loss against the learning rate (log x), with both rules marked."""
    fig = Figure(figsize=(7, 4.5), layout="tight")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(result.lrs, result.losses, color="0.75", lw=1, label="loss")
    ax.plot(result.lrs, result.smoothed, color="C0", lw=2, label="smoothed loss")
    marks = [
        (result.minimum, "C3", "minimum"),
        (result.steepest, "C2", "steepest descent"),
        (result.suggestion, "C1", "suggestion (minimum / 10)"),
    ]
    for lr, color, label in marks:
        if lr:
            ax.axvline(lr, color=color, ls="--", lw=1, label=f"{label}: {lr:.2g}")
    ax.set_xscale("log")
    finite = [x for x in result.smoothed if math.isfinite(x)]
    if finite:
        # from the lowest raw loss to the start of the curve (or 4x the smoothed minimum, if higher):
        # the whole drop stays in view, the blow-up past the minimum is cut off
        raw_low = min((x for x in result.losses if math.isfinite(x)), default=min(finite))
        low = min(min(finite), raw_low)
        high = min(max(finite), max(finite[0], DIVERGE_FACTOR * min(finite)))
        pad = 0.1 * (high - low) or 0.01 * abs(low) or 0.1
        ax.set_ylim(low - pad, high + pad)
    ax.set(xlabel="learning rate", ylabel="loss", title="learning-rate range test")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
