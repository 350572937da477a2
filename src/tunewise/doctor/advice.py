"""Advice: the doctor's knowledge of what causes a problem and which config change fixes it.

One place for the learning-rate bands (the rules, `tunewise check` and the advice read them), the
ranked causes and fixes of each kind of problem, the order in which recovery tries the divergence
fixes, and the fixes for memory. Each `*_advice` function returns (causes, fixes), paired and ranked
with the run's facts; the rule modules (divergence, progress, masking, overfitting, memory) call them.
"""

from __future__ import annotations

from tunewise.doctor.curve import finite
from tunewise.doctor.findings import Advice, Fix, fmt_lr, num, rank_advice

# Rates below LOW_LR barely move a run, above HIGH_LR they often blow it up; None = method unknown.
LOW_LR = {"lora": 5e-5, "qlora": 5e-5, "full": 1e-6, None: 5e-6}
HIGH_LR = {"lora": 1e-3, "qlora": 1e-3, "full": 1e-4, None: 1e-3}
TYPICAL_LR = {"lora": "1e-4 to 3e-4", "qlora": "1e-4 to 3e-4", "full": "1e-5 to 5e-5"}
SAFE_MAX_GRAD_NORM = 0.3  # the clipping the lesson recommends, and the divergence fix
LR_CUT = 10  # the divergence fix divides the learning rate by this; the flat fix multiplies by it
RECOVERY_WARMUP_STEPS = 100  # the warmup recovery adds when lr and clipping did not help


def divergence_advice(
    method: str | None,
    lr: float | None,
    clip: float | None,
    warmup: int | None,
    total: int | None,
) -> Advice:
    """Causes and fixes of non-finite values, spikes and explosions, ranked with the run's facts."""
    high = lr is not None and lr > HIGH_LR.get(method, HIGH_LR[None])
    typical = f"; {method} usually trains at {TYPICAL_LR[method]}" if method in TYPICAL_LR else ""
    lr_fix = Fix(
        f"training.learning_rate={fmt_lr(lr / LR_CUT)}" if lr else None,
        "a tenth of the rate: smaller steps do not overshoot",
    )
    clip_text = (
        "max_grad_norm is 0 (no clipping): one large gradient can throw the weights off"
        if clip == 0
        else f"gradient clipping too loose (max_grad_norm {clip})"
        if clip
        else "no or too little gradient clipping"
    )
    warm = max(100, (total or 0) // 10)
    warm = min(warm, total // 2) if total and total >= 2 else warm  # never most of a short run
    warm_text = (
        "no warmup: the full rate hits fresh weights at step 1"
        if warmup == 0
        else f"too little warmup ({warmup} steps)"
        if warmup
        else "too little warmup"
    )
    items = [
        (4 + (6 if high else 0), f"learning rate too high ({fmt_lr(lr)}{typical})", lr_fix),
        (
            3 + (5 if clip == 0 else 0) - (2 if clip and clip <= SAFE_MAX_GRAD_NORM else 0),
            clip_text,
            Fix(
                f"training.max_grad_norm={SAFE_MAX_GRAD_NORM}",
                f"clip each update's gradient norm to {SAFE_MAX_GRAD_NORM}",
            ),
        ),
        (
            2 + (3 if warmup == 0 else 0),
            warm_text,
            Fix(f"training.warmup_steps={warm}", "ramp the rate up so the first updates are small"),
        ),
        (
            1,
            "a bad example in the batch (empty target, extreme length, garbage tokens)",
            Fix(
                None,
                "filter the dataset: `tunewise inspect` shows examples with no trained tokens or "
                "extreme length",
            ),
        ),
    ]
    return rank_advice(items)


def recovery_fixes(learning_rate: float, max_grad_norm: float | None) -> list[Fix]:
    """The divergence fixes in the order `doctor.on_divergence: recover` applies them, one per attempt:
    the learning rate / 10, then clipping (unless it is tight already), then warmup."""
    order = [Fix(f"training.learning_rate={learning_rate / LR_CUT:.3g}", f"learning rate / {LR_CUT}")]
    if not max_grad_norm or max_grad_norm > SAFE_MAX_GRAD_NORM:
        order.append(
            Fix(f"training.max_grad_norm={SAFE_MAX_GRAD_NORM}", f"clip gradients at {SAFE_MAX_GRAD_NORM}")
        )
    order.append(
        Fix(
            f"training.warmup_steps={RECOVERY_WARMUP_STEPS}",
            f"warm up over {RECOVERY_WARMUP_STEPS} steps",
        )
    )
    return order


def flat_advice(method: str | None, lr: float | None, grad: float | None, zero_tokens: bool) -> Advice:
    """Causes and fixes of a loss that does not move, ranked with the run's facts."""
    low = lr is not None and lr < LOW_LR.get(method, LOW_LR[None])
    if low and method in ("lora", "qlora"):
        lr_text = f"learning rate {fmt_lr(lr)} is too low: a LoRA run at a full-fine-tuning rate"
    elif low:
        lr_text = f"learning rate {fmt_lr(lr)} is too low for {method or 'any'} fine-tuning"
    else:
        lr_text = f"learning rate too low ({fmt_lr(lr)})"
    no_grad = grad is not None and grad < 1e-8
    masked = " (trainable_tokens is 0)" if zero_tokens else ""
    items = [
        (
            3 + (20 if masked else 0),
            f"labels are masked: few or no tokens are trained{masked}",
            Fix("data.train_on=assistant", "train the assistant turns; `tunewise inspect` shows the -100s"),
        ),
        (
            2 + (10 if low else 0),
            lr_text,
            Fix(f"training.learning_rate={fmt_lr(lr * LR_CUT)}" if lr else None, "a 10x larger rate"),
        ),
        (
            1 + (15 if no_grad else 0),
            "the adapter receives no gradients" + (f" (median grad_norm {num(grad)})" if no_grad else ""),
            Fix(
                None,
                "with gradient checkpointing on a PEFT model call "
                "`model.enable_input_require_grads()` so gradients reach the adapter; check that "
                "trainable parameters are > 0",
            ),
        ),
    ]
    return rank_advice(items)


def masking_advice() -> Advice:
    """Causes and fixes of batches without trained tokens, most likely first."""
    return rank_advice(
        [
            (
                3,
                "labels are masked: every label is -100 (trained_tokens 0), so no token carries loss",
                Fix(
                    "data.train_on=assistant",
                    "train the assistant turns; `tunewise inspect` shows which tokens are trained "
                    "(the -100s)",
                ),
            ),
            (
                2,
                "the responses are cut off: the prompt fills data.max_seq_length, leaving no response token",
                Fix(
                    "data.too_long=drop",
                    "drop examples whose response does not fit (or raise "
                    "data.max_seq_length); `tunewise check` lists them",
                ),
            ),
            (
                1,
                "the data was read wrongly: no turn is recognised as the assistant's",
                Fix(None, "`tunewise inspect` shows how each row was read and which role each turn got"),
            ),
        ]
    )


def overfit_advice(method: str | None, best_eval_epoch: float | None) -> Advice:
    """Causes and fixes of overfitting, in the order to try them (no adapter fixes for a full fine-tune)."""
    known = finite(best_eval_epoch)
    when = f": eval loss was best at epoch {best_eval_epoch:.2f}" if known else ""
    epochs = max(1, round(best_eval_epoch)) if known else 1
    items = [
        (
            5,
            "too little data for this many passes: the model memorizes it",
            Fix(None, "add more, or more varied, training examples"),
        ),
        (4, f"too many epochs{when}", Fix(f"training.num_train_epochs={epochs}", "stop near the best eval")),
        (3, "too little adapter dropout", Fix("adapter.dropout=0.1", "dropout regularizes the adapter")),
        (
            2,
            "adapter rank larger than the data needs",
            Fix("adapter.r=4", "a smaller adapter memorizes less"),
        ),
        (1, "too little weight decay", Fix("training.weight_decay=0.01", "pulls weights toward zero")),
    ]
    if method == "full":
        items = [item for item in items if not (item[2].change or "").startswith("adapter.")]
    return rank_advice(items)


def memory_fixes(
    method: str, checkpointing: bool, batch: int, accumulation: int, max_seq_length: int
) -> list[Fix]:
    """What lowers a run's peak memory, the cheapest first: gradient checkpointing, 4-bit weights, half
    the batch (twice the accumulation: the same effective batch), half the sequence length."""
    fixes = []
    if not checkpointing:
        fixes.append(
            Fix("training.gradient_checkpointing=true", "recompute activations instead of keeping them")
        )
    if method != "qlora":
        fixes.append(Fix("model.method=qlora", "4-bit base weights"))
    if batch > 1:
        fixes.append(
            Fix(
                f"training.per_device_train_batch_size={batch // 2} "
                f"training.gradient_accumulation_steps={accumulation * 2}",
                "half the micro-batch, the same effective batch",
            )
        )
    fixes.append(Fix(f"data.max_seq_length={max(max_seq_length // 2, 8)}", "shorter sequences"))
    return fixes


def memory_advice() -> Advice:
    """Causes of memory near the device's limit (the live rule knows no config to spell fixes with)."""
    return ["batch or sequence length too large for this device"], []


def bf16_fix(precision: str | None, why: str) -> Fix:
    """Switch to bf16: tunewise's `model.precision` for a run known to be fp16 (a tunewise run's plan.json
    says), else the TrainingArguments switch, since a run whose precision is unknown has no tunewise plan."""
    return Fix("model.precision=bf16" if precision == "fp16" else "training.bf16=true", why)


def overflow_advice(
    precision: str | None, method: str | None, lr: float | None, clip: float | None
) -> Advice:
    """Causes and fixes of a grad norm that is NaN/inf at a step while the loss stays calm, for the run's
    precision (bf16 | fp16 | fp32; None when unknown). Under fp16 it is the loss scaler's overflow and bf16
    is the cure; under bf16 (fp32's range, no scaler) or fp32 it is a real blow-up: a smaller rate,
    clipping, and under bf16 fp32 for the part of the model that loses precision."""
    bad_cause = "a batch with extreme values (a very long or garbage example)"
    bad_fix = Fix(None, "`tunewise inspect` shows the longest examples; drop garbage rows")
    if precision in (None, "fp16"):
        maybe = "" if precision == "fp16" else "if the run is fp16: "
        return rank_advice(
            [
                (
                    3,
                    f"{maybe}fp16 overflow: the loss scaler found inf/NaN gradients and skipped the step "
                    "(harmless once or twice; the scaler lowers its scale)",
                    bf16_fix(precision, "bf16 has fp32's range and needs no loss scaling, where supported"),
                ),
                (2, bad_cause, bad_fix),
            ]
        )
    high = lr is not None and lr > HIGH_LR.get(method, HIGH_LR[None])
    items = [
        (
            3 + (3 if high else 0),
            f"a gradient too large for the step size: under {precision} no loss scaler skips an overflow, "
            f"so an inf/NaN gradient is a real blow-up (learning rate {fmt_lr(lr)})",
            Fix(
                f"training.learning_rate={fmt_lr(lr / LR_CUT)}" if lr else None,
                "a tenth of the rate: smaller updates keep the activations in range",
            ),
        ),
        (1, bad_cause, bad_fix),
    ]
    if not clip or clip > SAFE_MAX_GRAD_NORM:  # tight clipping already: the same change would do nothing
        items.append(
            (
                2 + (2 if not clip else 0),
                "max_grad_norm is 0 (no clipping)"
                if clip == 0
                else f"gradient clipping too loose ({clip})"
                if clip
                else "no or loose gradient clipping",
                Fix(
                    f"training.max_grad_norm={SAFE_MAX_GRAD_NORM}",
                    "clip each update: the large finite gradients before an overflow cannot throw weights",
                ),
            )
        )
    if precision == "bf16":
        items.append(
            (
                2,
                "bf16 keeps fp32's range but only 8 bits of mantissa: an unstable part (attention scores, a "
                "norm layer, the loss over a large vocabulary) can round its way to inf",
                Fix(
                    "model.precision=fp32",
                    "train in fp32 to see whether bf16 is the cause (slower, more memory); then keep "
                    "only the unstable modules in fp32",
                ),
            )
        )
    return rank_advice(items)


def hidden_nan_advice(divergence: Advice, precision: str | None = None) -> Advice:
    """A NaN the Trainer's logging filter wrote as 0.0: the divergence causes and fixes, then the ones that
    only a hidden NaN has: the filter that hid it, and, for the run's precision, the half-precision cause
    (an fp16 overflow, cured by bf16; under bf16, its low mantissa, cured by fp32 where it is unstable)."""
    causes, fixes = divergence
    half: list[tuple[str, Fix]] = []
    if precision in (None, "fp16"):
        half = [
            (
                "a half-precision (fp16) overflow in the forward pass: some models (T5, Gemma, ...) overflow "
                "in fp16",
                bf16_fix(precision, "bf16 has fp32's range, where the hardware supports it"),
            )
        ]
    elif precision == "bf16":
        half = [
            (
                "bf16's 8-bit mantissa in an unstable part of the model (attention scores, a norm layer)",
                Fix("model.precision=fp32", "train in fp32 to see whether bf16 is the cause (slower)"),
            )
        ]
    causes = [
        *causes,
        *(cause for cause, _ in half),
        "Trainer's logging_nan_inf_filter logs a NaN loss as 0.0, which hides when it began",
    ]
    fixes = [
        *fixes,
        *(fix for _, fix in half),
        Fix("training.logging_nan_inf_filter=false", "log a NaN loss as NaN, not as 0.0"),
    ]
    return causes, fixes


def _zero_lr_cause(lr: float | None, unseen: str) -> tuple[int, str, Fix]:
    """A learning rate of 0 as a ranked cause: first when the log shows it, `unseen` and last otherwise."""
    zero_lr = lr is not None and lr <= 0
    return (
        1 + (5 if zero_lr else 0),
        f"the learning rate is {fmt_lr(lr)}" if zero_lr else unseen,
        Fix("training.learning_rate=2.0e-04", "a typical LoRA rate (2e-5 for full fine-tuning)"),
    )


def nothing_trained_advice(lr: float | None, gradient: bool = False) -> Advice:
    """Causes and fixes of a loss of exactly 0.0: no token or no weight is trained. `gradient`: a finite,
    non-zero grad norm came with it (from the first log): the labels train only what the model predicts."""
    labels = (
        "the labels train only tokens the model already predicts (padding, EOS, the chat template), so the "
        "loss is under the log's 4 decimals from the first step"
        if gradient
        else "labels are masked: every label is -100, so no token carries loss"
    )
    return rank_advice(
        [
            (
                3,
                labels,
                Fix(
                    "data.train_on=assistant",
                    "train the assistant turns; `tunewise inspect` shows which tokens carry a label",
                ),
            ),
            (
                1 if gradient else 2,
                "no weight is trainable (frozen model, or an adapter that is not attached)",
                Fix(
                    None,
                    "check that trainable parameters are > 0 (requires_grad); with gradient checkpointing "
                    "on a "
                    "PEFT model call `model.enable_input_require_grads()`",
                ),
            ),
            _zero_lr_cause(lr, "the learning rate is 0 for the whole run"),
        ]
    )


def oscillation_advice(method: str | None, lr: float | None, clip: float | None) -> Advice:
    """Causes and fixes of a loss that swings without a trend: steps too large for the noise."""
    high = lr is not None and lr > HIGH_LR.get(method, HIGH_LR[None])
    return rank_advice(
        [
            (
                3 + (5 if high else 0),
                f"learning rate too high ({fmt_lr(lr)}): each step overshoots",
                Fix(f"training.learning_rate={fmt_lr(lr / LR_CUT)}" if lr else None, "a tenth of the rate"),
            ),
            (
                2,
                "batches too small: each step follows the noise of a few examples",
                Fix("training.gradient_accumulation_steps=8", "average more examples per update"),
            ),
            (
                1 + (2 if not clip else 0),
                "no or loose gradient clipping" if not clip else f"gradient clipping at {clip}",
                Fix(f"training.max_grad_norm={SAFE_MAX_GRAD_NORM}", "clip each update's gradient norm"),
            ),
        ]
    )


def eval_non_finite_advice(precision: str | None = None) -> Advice:
    """Causes and fixes of a NaN/inf eval loss while the training loss is finite."""
    half = "or use bf16" if precision != "bf16" else "not in half precision"
    return rank_advice(
        [
            (
                3,
                "validation examples with no trained token (every label -100): their loss is 0/0",
                Fix(
                    "data.too_long=drop",
                    "drop examples whose response does not fit; `tunewise check` lists them",
                ),
            ),
            (
                2,
                "fp16 overflow during evaluation (half-precision eval)",
                Fix("training.fp16_full_eval=false", f"evaluate in the training precision, {half}"),
            ),
        ]
    )


def frozen_weights_advice(lr: float | None) -> Advice:
    """Causes and fixes of real losses that repeat epoch after epoch: the weights never change."""
    return rank_advice(
        [
            (
                3,
                "no weight is trainable, or the optimizer holds other parameters than the model trains "
                "(a frozen model, an adapter that is not attached, an optimizer built before the adapter)",
                Fix(
                    None,
                    "print the trainable parameter count (PEFT: `model.print_trainable_parameters()`) and "
                    "build the optimizer from the final model's parameters with requires_grad",
                ),
            ),
            _zero_lr_cause(lr, "the learning rate is 0 (or the scheduler holds it at 0)"),
            (
                1,
                "every update is skipped (an fp16 loss scaler that overflows at every step, or a step "
                "that is never called)",
                Fix(None, "check that optimizer.step() runs and that the grad norm is finite"),
            ),
        ]
    )
