"""Reading a ladder run's curve by the numbers alone (never from what the doctor said).

Shared by the ladder benchmark (benchmarks/bench_doctor_ladder.py) and the corpus fixtures it leaves
(save_fixtures.py): where the loss left its step-1 level, a label from the curve, and the curve as a
Hugging Face trainer_state.json.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

ROSE, FELL = 2.0, 0.5
DEFINITIONS = {
    "rose_at": f"first step whose loss is above {ROSE}x the step-1 loss, or not finite",
    "fell_at": f"first step whose loss is below {FELL}x the step-1 loss",
    "delay": "the first live error's step minus rose_at",
    "by_numbers": (
        "the label of tests/fixtures/real_runs/LABELS.md's rules R1-R8 (train logs only), then one read: R4a "
        "against the first log when the loss exploded within the first three (curves.label_run)"
    ),
}


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_records(run_dir: Path) -> list[dict]:
    """The per-step train records of a tunewise run directory's metrics.jsonl."""
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("type") == "train"]


def left_start(losses: list[tuple[int, float]]) -> dict:
    """Where the loss left its step-1 level: `rose_at` and `fell_at` (None when it never did)."""
    if not losses:
        return {"rose_at": None, "fell_at": None}
    start = losses[0][1]
    rose = next((s for s, x in losses if not finite(x) or x > ROSE * start), None)
    fell = next((s for s, x in losses if finite(x) and x < FELL * start), None)
    return {"rose_at": rose, "fell_at": fell}


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _running_median(values: list[float], window: int) -> list[float]:
    """The median of each full trailing window (the whole curve when it is shorter than one)."""
    if len(values) <= window:
        return [_median(values)]
    return [_median(values[i - window + 1 : i + 1]) for i in range(window - 1, len(values))]


def _jumps(values: list[float]) -> int:
    """R6d: logs at least 3x, and 0.5 above, the median of the 5 logs before them."""
    count = 0
    for i in range(5, len(values)):
        before = _median(values[i - 5 : i])
        count += values[i] >= 3 * before and values[i] >= before + 0.5
    return count


def label_by_numbers(losses: list[float], grad_norms: list[float | None]) -> dict:
    """LABELS.md's rules R1-R8 for a log without evaluations, applied to the numbers alone.

    Returns {"label", "cause", "rule", "numbers"}: the first rule that holds decides.
    """
    n = len(losses)
    grads = [g for g in grad_norms if g is not None]
    if n < 5:
        return {"label": "insufficient-data", "cause": None, "rule": "R1", "numbers": {"n": n}}
    zeros = [i for i, x in enumerate(losses) if x == 0.0]
    if len(zeros) >= 0.8 * n:
        at_zero = [grad_norms[i] for i in zeros if grad_norms[i] is not None]
        if at_zero and sum(not finite(g) for g in at_zero) > len(at_zero) / 2:
            return {"label": "diverged", "cause": "nan_hidden", "rule": "R2a", "numbers": {"n": n}}
        if at_zero and sum(g == 0.0 for g in at_zero) > len(at_zero) / 2:
            return {"label": "flat", "cause": "nothing_trained", "rule": "R2b", "numbers": {"n": n}}
        if not at_zero:
            first_zero = losses[0] == 0.0
            return {
                "label": "flat" if first_zero else "diverged",
                "cause": "nothing_trained" if first_zero else "nan_hidden",
                "rule": "R2c",
                "numbers": {"n": n},
            }
    bad = sum(not finite(x) for x in losses)
    if not finite(losses[-1]) or bad >= 3:
        return {"label": "diverged", "cause": "nan", "rule": "R3a", "numbers": {"n": n, "non_finite": bad}}
    nan_grads = sum(not finite(g) for g in grads)
    if nan_grads >= 3 and nan_grads > 0.05 * n:
        return {
            "label": "diverged",
            "cause": "nan",
            "rule": "R3b",
            "numbers": {"n": n, "nan_grads": nan_grads},
        }
    values = [x for x in losses if finite(x)]
    s0 = values[0]
    start = max(s0, _median(values[:3]))
    end = _median(values[-max(3, n // 20) :])
    window = max(5, n // 10)
    smooth = _running_median(values, window)
    low = min(smooth)
    i_min = smooth.index(low) + min(window, len(values)) - 1  # the log where that window ends
    drop, done = start - low, (start - end) / start
    numbers = {"n": n, "S": round(start, 4), "F": round(end, 4), "m": round(low, 4), "D": round(done, 3)}

    def verdict(label: str, cause: str | None, rule: str) -> dict:
        return {"label": label, "cause": cause, "rule": rule, "numbers": numbers}

    if end >= 1.5 * start and end >= start + 0.2:
        return verdict("diverged", "explosion", "R4a")
    if drop >= 0.1 * start and i_min < 0.9 * n and end >= 1.5 * low and end - low >= 0.5 * drop:
        return verdict("diverged", "degradation", "R4b")
    if any(x >= 3 * s0 and x >= s0 + 1.0 for x in values[1:]):
        return verdict("unstable", "explosion", "R6a")
    if drop >= 0.1 * start and end >= 1.2 * low and end - low >= 0.25 * drop:
        return verdict("unstable", "degradation", "R6b")
    tail = values[n // 3 :] if len(values) == n else values[len(values) // 3 :]
    deciles = statistics.quantiles(tail, n=10, method="inclusive")
    if done < 0.10 and (deciles[8] - deciles[0]) / _median(tail) >= 0.5:
        return verdict("unstable", "oscillation", "R6c")
    if _jumps(values) >= 2:
        return verdict("unstable", "jumps", "R6d")
    if done < 0.10:
        return verdict("flat", "not_learning", "R7")
    return verdict("healthy", None, "R8")


def label_run(losses: list[float], grad_norms: list[float | None]) -> dict:
    """LABELS.md's rules, then the human read they leave open for an explosion in the first logs.

    R4a measures the end against S, the larger of the first log and the median of the first three;
    when the loss exploded within those three logs S is already exploded and R4a cannot see that the
    run ended far above where it started. The read applies R4a against the first log itself (the loss
    of the model before any update): F >= 1.5 x S0 and F >= S0 + 0.2 -> diverged.
    """
    verdict = label_by_numbers(losses, grad_norms)
    if verdict["label"] in ("diverged", "insufficient-data") or not verdict["numbers"].get("F"):
        return verdict
    s0, end = losses[0], verdict["numbers"]["F"]
    if finite(s0) and end >= 1.5 * s0 and end >= s0 + 0.2:
        note = f"{verdict['rule']} by rule; read: F={end} is {end / s0:.1f}x the first log S0={round(s0, 4)}"
        return {**verdict, "label": "diverged", "cause": "explosion", "rule": note}
    return verdict


def to_trainer_state(records: list[dict], batch_size: int) -> dict:
    """A metrics.jsonl curve as the trainer_state.json Trainer writes with `logging_steps: 1`."""
    history = [
        {
            "epoch": r.get("epoch"),
            "grad_norm": r.get("grad_norm"),
            "learning_rate": r.get("learning_rate"),
            "loss": r["loss"],
            "step": r["step"],
        }
        for r in records
    ]
    last = records[-1]["step"] if records else 0
    return {
        "global_step": last,
        "max_steps": last,
        "logging_steps": 1,
        "train_batch_size": batch_size,
        "log_history": history,
    }
