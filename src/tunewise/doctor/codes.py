"""The catalogue of finding codes, as data: each code's severities, the verdict it counts toward, the
module whose rule raises it and one line of description; and the thresholds of every rule module.

To add a finding: write its rule in the family's module (or a new module next to them), give its
thresholds names at the top of that module, and add the code here and its module's thresholds to
THRESHOLDS. A test checks that every code is raised by some fixture and that every numeric
constant of a rule module is listed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tunewise.doctor.findings import Severity

Verdict = Literal["healthy", "diverged", "flat", "overfitting", "unstable", "insufficient-data"]


@dataclass(frozen=True)
class Code:
    """One kind of finding."""

    severities: tuple[Severity, ...]  # every severity a finding of this code can have
    verdict: Verdict | None  # what it counts toward; "diverged" codes count as "unstable" once recovered
    raised_by: str  # the module whose rule raises it
    description: str


CODES: dict[str, Code] = {
    "non_finite": Code(
        ("error", "warning"),
        "diverged",
        "tunewise.doctor.divergence",
        "a NaN or inf loss or gradient norm (also a NaN that Trainer's logging filter wrote as 0.0)",
    ),
    "loss_spike": Code(
        ("warning",),
        "unstable",
        "tunewise.doctor.divergence",
        "the loss jumped well above its running minimum and its recent median",
    ),
    "loss_explosion": Code(
        ("error", "warning"),
        "diverged",
        "tunewise.doctor.divergence",
        "a loss spike far above the minimum, or one that did not come back",
    ),
    "grad_norm_spike": Code(
        ("warning",),
        "unstable",
        "tunewise.doctor.divergence",
        "the gradient norm jumped to many times its recent median",
    ),
    "grad_norm_non_finite": Code(
        ("warning",),
        None,
        "tunewise.doctor.divergence",
        "a NaN/inf grad norm at a step or two while the loss stays calm: an fp16 overflow, step skipped",
    ),
    "loss_degradation": Code(
        ("error", "warning"),
        "diverged",
        "tunewise.doctor.divergence",
        "the smoothed loss climbed far above its minimum and stayed there, without NaN or a single spike",
    ),
    "loss_rising": Code(
        ("warning",),
        "unstable",
        "tunewise.doctor.divergence",
        "the loss ended well above its minimum: a milder climb than loss_degradation",
    ),
    "oscillation": Code(
        ("warning",),
        "unstable",
        "tunewise.doctor.progress",
        "the loss swings widely without a trend",
    ),
    "not_falling": Code(
        ("warning", "info"),
        None,
        "tunewise.doctor.progress",
        "the loss is not falling after the first steps (info once it fell later)",
    ),
    "flat": Code(
        ("warning", "error", "info"),
        "flat",
        "tunewise.doctor.progress",
        "the loss ended less than 10% below where it started",
    ),
    "no_trainable_tokens": Code(
        ("warning", "error"),
        "flat",
        "tunewise.doctor.masking",
        "batches in which every label is -100: nothing to learn",
    ),
    "nothing_trained": Code(
        ("warning", "error"),
        "flat",
        "tunewise.doctor.masking",
        "loss exactly 0.0 with no gradient, or from the first log on: no token or weight is trained",
    ),
    "weights_unchanged": Code(
        ("error",),
        "flat",
        "tunewise.doctor.masking",
        "each batch's loss repeats the loss one epoch before: the weights are not changing",
    ),
    "eval_degradation": Code(
        ("error", "warning"),
        "diverged",
        "tunewise.doctor.overfitting",
        "eval loss far above its best while train loss did not fall: the run got worse at everything",
    ),
    "eval_rising": Code(
        ("warning",),
        "unstable",
        "tunewise.doctor.overfitting",
        "the last eval loss well above its best while train loss did not fall: milder than eval_degradation",
    ),
    "eval_non_finite": Code(
        ("warning",),
        None,
        "tunewise.doctor.overfitting",
        "a NaN/inf eval loss while the training loss is finite",
    ),
    "overfitting": Code(
        ("warning",),
        "overfitting",
        "tunewise.doctor.overfitting",
        "eval loss rose clearly (twice in a row, or for the last evals) above its best while train loss fell",
    ),
    "generalization_gap": Code(
        ("warning",),
        None,
        "tunewise.doctor.overfitting",
        "the gap between eval and train loss is large and growing",
    ),
    "memorization": Code(
        ("warning",),
        "overfitting",
        "tunewise.doctor.overfitting",
        "train loss near zero while eval loss stays high",
    ),
    "epoch_drop": Code(
        ("warning",),
        None,
        "tunewise.doctor.overfitting",
        "train loss drops sharply where a new epoch begins: the examples are remembered",
    ),
    "memory_high": Code(
        ("warning",),
        None,
        "tunewise.doctor.memory",
        "memory at step 1 above 90% of the device's",
    ),
    "recovery": Code(
        ("info",),
        None,
        "tunewise.training.recovery",
        "the run diverged and recovery restarted it from a checkpoint with the next fix",
    ),
    "insufficient_data": Code(
        ("info",),
        "insufficient-data",
        "tunewise.doctor.diagnose",
        "too few train points to judge the curve",
    ),
}

# module -> its named thresholds (the numbers a rule compares against); the mutation check varies them.
THRESHOLDS: dict[str, tuple[str, ...]] = {
    "tunewise.doctor.divergence": (
        "SPIKE_RATIO",
        "SPIKE_ABOVE_MIN",
        "SPIKE_ABOVE_MEDIAN",
        "MEDIAN_WINDOW",
        "SPIKE_SIGMAS",
        "NOISE_WINDOW",
        "MIN_NOISE_POINTS",
        "CALM_RATIO",
        "CALM_ABOVE",
        "EXPLOSION_RATIO",
        "EXPLOSION_ABOVE_MIN",
        "EXPLOSION_POINTS",
        "GRAD_SPIKE_RATIO",
        "GRAD_CALM_RATIO",
        "GRAD_WINDOW",
        "EARLY_POINTS",
        "EARLY_RATIO",
        "EARLY_ABOVE",
        "KNOWS_NOTHING",
        "KNEW_SOMETHING",
        "ZERO_FROM",
        "GRAD_NAN_POINTS",
        "DEGRADE_RATIO",
        "DEGRADE_OF_DROP",
        "DEGRADE_SIGMAS",
        "DEGRADE_POINTS",
        "RISE_RATIO",
        "RISE_OF_DROP",
        "END_ABOVE",
        "LEARNED_MIN",
        "ZIGZAG_MAX",
    ),
    "tunewise.doctor.progress": (
        "NOT_FALLING_AT",
        "FLAT_AT",
        "FLAT_ERROR_AT",
        "FLAT_BAND",
        "NOISY",
        "MIN_FALL",
        "FLAT_MIN_POINTS",
        "OSC_SPREAD",
        "OSC_MIN_POINTS",
    ),
    "tunewise.doctor.masking": ("NO_SIGNAL_POINTS", "ZERO_POINTS", "REPEAT_POINTS", "REPEAT_TOLERANCE"),
    "tunewise.doctor.overfitting": (
        "GAP_LIMIT",
        "MEMORIZED_TRAIN",
        "MEMORIZED_EVAL",
        "EPOCH_DROP",
        "EPOCH_DROP_MIN",
        "EVAL_RISE",
        "EVAL_DEGRADE",
        "EVAL_RISING",
        "EVAL_SUSTAINED",
        "SUSTAINED_EVALS",
        "TRAIN_FELL",
    ),
    "tunewise.doctor.memory": ("MEMORY_HIGH",),
    "tunewise.doctor.diagnose": ("MIN_POINTS", "GRAD_BLIP_POINTS", "SPIKE_UNSTABLE"),
}

DIVERGED_CODES = frozenset(code for code, c in CODES.items() if c.verdict == "diverged")
UNSTABLE_CODES = frozenset(code for code, c in CODES.items() if c.verdict in ("diverged", "unstable"))
OVERFIT_CODES = frozenset(code for code, c in CODES.items() if c.verdict == "overfitting")
