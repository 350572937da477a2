"""The failure classes of issue #14, each fed live (one point at a time) and diagnosed post hoc.

Each curve is shaped after a real run: the lesson's too-high learning rate on SmolLM2, the `{'loss': 0.0,
'grad_norm': nan}` logs of every trainer's issue tracker, a warmup that ends too high, a loss swinging
between 6 and 16, and the false alarms to avoid (a tiny dataset memorized to ~0, an eval plateau, an
fp16 overflow at one step).
"""

from __future__ import annotations

import json
import math

import pytest
from doctor_curves import Curve, CurveWatcher, EvalPoint, TrainPoint, curve_of, falling, feed, fired, noisy

from tunewise.doctor.diagnose import _summarize, diagnose_curve

SMOLLM2_VOCAB = 49152  # ln(49152) = 10.80: the loss of a model that knows nothing

# The run: SmolLM2 LoRA, constant lr 0.1, no warmup, clipping 0.3, 20 steps.
LR_01 = [
    0.48,
    8.6,
    14.0,
    24.0,
    25.0,
    22.0,
    19.0,
    16.0,
    11.0,
    10.4,
    9.9,
    9.5,
    9.0,
    8.6,
    8.2,
    7.8,
    7.5,
    7.2,
    7.0,
    6.8,
]
LR_01_GRADS = [
    0.75,
    31.0,
    52.0,
    83.0,
    70.0,
    55.0,
    40.0,
    33.0,
    25.0,
    20.0,
    18.0,
    16.0,
    14.0,
    12.0,
    11.0,
    10.0,
    9.0,
    8.5,
    8.0,
    7.5,
]
# lr 0.03: 0.48 -> 21 by step 4, up to 78 by step 20.
LR_003 = [
    0.48,
    0.55,
    2.9,
    21.0,
    30.0,
    38.0,
    45.0,
    50.0,
    55.0,
    58.0,
    61.0,
    64.0,
    66.0,
    68.0,
    70.0,
    72.0,
    74.0,
    75.0,
    77.0,
    78.0,
]


def watcher(**kwargs: object) -> CurveWatcher:
    return CurveWatcher(**{"method": "lora", "learning_rate": 2e-4, "max_grad_norm": 0.3, **kwargs})


def codes(d) -> set[str]:
    return {f.code for f in d.findings}


def serious(d) -> list[tuple[int | None, str, str]]:
    return [(f.step, f.code, f.severity) for f in d.findings if f.severity != "info"]


# ----------------------------------------------------------------------------- (0) blow-up in the first steps


@pytest.mark.parametrize("vocab", [SMOLLM2_VOCAB, None])
def test_explosion_at_step_2_is_found_live_at_step_2(vocab: int | None) -> None:
    w = watcher(learning_rate=0.1, warmup_steps=0, vocab_size=vocab)
    found = feed(w, curve_of(LR_01, LR_01_GRADS, lr=0.1))
    first = fired(found)[0]
    assert first == (2, "loss_explosion", "error"), fired(found)
    explosion = found[2][0]
    assert explosion.evidence["loss"] == 8.6 and explosion.evidence["start_loss"] == pytest.approx(0.48)
    assert explosion.fixes[0].change == "training.learning_rate=1.0e-02"
    w.finish()
    assert "flat" not in {f.code for f in w.findings}, "an exploded start was taken as the 'start'"


def test_explosion_in_the_first_steps_is_diverged_post_hoc_never_healthy_nor_flat() -> None:
    context = {"method": "lora", "learning_rate": 0.1, "warmup_steps": 0, "vocab_size": SMOLLM2_VOCAB}
    d = diagnose_curve(curve_of(LR_01, LR_01_GRADS, lr=0.1), context)
    assert d.verdict == "diverged", d.summary
    assert "flat" not in codes(d) and d.exit_code() == 2
    assert "step 2" in d.summary and "0.48" in d.summary


def test_explosion_at_lr_003_is_found_by_step_4() -> None:
    found = feed(watcher(learning_rate=0.03), curve_of(LR_003, lr=0.03))
    (step, code, severity) = fired(found)[0]
    assert code == "loss_explosion" and severity == "error" and step <= 4
    assert diagnose_curve(curve_of(LR_003, lr=0.03)).verdict == "diverged"


def test_loss_above_that_of_a_model_that_knows_nothing_is_an_explosion() -> None:
    # Calm at 4.0 for 30 steps, then 11.5: under 5x the minimum, but above ln(49152) = 10.8.
    losses = noisy(30, 4.0, 0.05) + [11.5, 11.2, 11.4, 11.3, 11.1, 11.2]
    found = feed(watcher(vocab_size=SMOLLM2_VOCAB), curve_of(losses))
    assert (31, "loss_explosion", "error") in fired(found), fired(found)
    assert found[31][0].evidence["knows_nothing_loss"] == pytest.approx(math.log(SMOLLM2_VOCAB))
    # Without the vocabulary size the same jump is a spike (and it never came back: an explosion at the end).
    found = feed(watcher(), curve_of(losses))
    assert (31, "loss_spike", "warning") in fired(found)


def test_a_run_ending_far_above_where_it_started_is_never_healthy() -> None:
    # Falls a little, then climbs slowly to 3x its start: no single jump, no NaN.
    losses = [round(1.0 - 0.01 * i, 4) for i in range(20)] + [round(0.81 + 0.06 * i, 4) for i in range(40)]
    d = diagnose_curve(curve_of(losses))
    assert d.verdict == "diverged", d.summary
    assert "flat" not in codes(d)


def test_a_short_run_ending_far_above_its_start_is_diverged_not_flat() -> None:
    # 7 logs, 1.2 -> 2.4 without a 3x jump: too short for the degradation test, never "flat".
    d = diagnose_curve(curve_of([1.2, 1.25, 1.3, 1.6, 1.9, 2.2, 2.4]))
    assert d.verdict == "diverged" and d.evidence["cause"] == "degradation", d.summary
    assert "flat" not in codes(d)


# ----------------------------------------------------------------------------- (1) loss exactly 0.0


def test_zero_loss_with_nan_grad_norm_is_a_hidden_nan() -> None:
    losses = [1.9, 1.7, 1.6, 1.55, 1.5] + [0.0] * 25
    grads = [0.9, 0.8, 0.8, 0.7, 0.7] + [math.nan] * 25
    found = feed(watcher(), curve_of(losses, grads))
    assert fired(found)[0] == (6, "non_finite", "error")
    assert found[6][0].evidence["nan_hidden_by_logging_filter"] is True
    d = diagnose_curve(curve_of(losses, grads))
    assert d.verdict == "diverged" and d.evidence["cause"] == "nan_hidden"


def test_zero_loss_without_grad_norm_after_a_real_loss_is_a_hidden_nan() -> None:
    # Older transformers log no grad_norm: a loss cannot fall from 1.5 to exactly 0.0000 in one log.
    losses = [1.9, 1.7, 1.6, 1.55, 1.5] + [0.0] * 25
    found = feed(watcher(), curve_of(losses, [None] * 30))
    assert fired(found)[0] == (6, "non_finite", "error"), fired(found)
    finding = found[6][0]
    assert finding.evidence["nan_hidden_by_logging_filter"] is True
    assert "logging_nan_inf_filter" in finding.title
    d = diagnose_curve(curve_of(losses, [None] * 30))
    assert d.verdict == "diverged" and d.evidence["cause"] == "nan_hidden"
    assert math.isnan(d.evidence["loss_last"]) and d.evidence["loss_first"] == 1.9
    changes = [fix.change for fix in finding.fixes]
    assert (
        changes[0].startswith("training.learning_rate=")
        and "training.logging_nan_inf_filter=false" in changes
    )
    assert len(finding.causes) == len(finding.fixes)  # each cause paired with its fix


def test_zero_loss_with_zero_grad_norm_is_nothing_trained() -> None:
    losses = [0.0] * 30
    found = feed(watcher(), curve_of(losses, [0.0] * 30))
    errors = [(s, c) for s, c, sev in fired(found) if sev == "error"]
    assert errors and errors[0] == (3, "nothing_trained"), fired(found)
    d = diagnose_curve(curve_of(losses, [0.0] * 30))
    assert d.verdict == "flat" and d.evidence["cause"] == "nothing_trained"
    finding = next(f for f in d.findings if f.code == "nothing_trained")
    assert finding.fixes[0].change == "data.train_on=assistant"
    assert any("requires_grad" in fix.why or "trainable" in fix.why for fix in finding.fixes)


def test_zero_loss_after_a_real_loss_with_zero_grad_norm_is_nothing_trained() -> None:
    losses = [2.1, 2.0] + [0.0] * 28
    grads = [1.2, 1.1] + [0.0] * 28
    d = diagnose_curve(curve_of(losses, grads))
    assert d.verdict == "flat" and d.evidence["cause"] == "nothing_trained", d.summary


def test_zero_loss_from_the_first_log_with_a_finite_grad_norm_is_nothing_trained() -> None:
    # LLaMA-Factory #2726's class: every log 0.0 from step 1 while the grad norm is small and finite. No
    # real loss starts under the log's 4 decimals: the labels train only what the model already predicts.
    losses, grads = [0.0] * 7, [0.011, 0.009, 0.015, 0.017, 0.012, 0.010, 0.007]
    found = feed(watcher(), curve_of(losses, grads))
    errors = [(s, c) for s, c, sev in fired(found) if sev == "error"]
    assert errors and errors[0] == (3, "nothing_trained"), fired(found)
    d = diagnose_curve(curve_of(losses, grads))
    assert d.verdict == "flat" and d.evidence["cause"] == "nothing_trained", d.summary
    finding = next(f for f in d.findings if f.code == "nothing_trained" and f.severity == "error")
    assert "leave nothing to learn" in finding.title and "no gradient" not in finding.title
    assert "already predicts" in finding.causes[0] and finding.fixes[0].change == "data.train_on=assistant"


def test_zero_loss_after_a_real_loss_with_a_finite_grad_norm_is_not_nothing_trained() -> None:
    # The same 0.0 logs after a real loss are a fall (memorized), not "nothing trained".
    losses, grads = [0.9, 0.2, 0.01] + [0.0] * 7, [1.0, 0.5, 0.05] + [0.01] * 7
    d = diagnose_curve(curve_of(losses, grads))
    assert "nothing_trained" not in codes(d), d.summary


def test_memorized_to_exactly_zero_is_not_a_hidden_nan() -> None:
    # A tiny set memorized: 4-decimal logs reach 0.0 gradually, with finite gradients.
    losses = [2.2, 1.4, 0.7, 0.3, 0.1, 0.03, 0.008, 0.002, 0.0005, 0.0001] + [0.0] * 10
    grads = [3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.2, 0.08, 0.03, 0.01] + [0.004] * 10
    d = diagnose_curve(curve_of(losses, grads))
    assert d.verdict == "healthy", (d.summary, serious(d))


# ----------------------------------------------------------------------------- (2) degradation without NaN


# Warmup to a rate that is too high: the minimum at step 30, then a climb that never comes back.
DEGRADED = (
    falling(30, start=2.0, floor=1.2, tau=8, noise=0.01)
    + [round(1.2 + 0.04 * i, 4) for i in range(1, 41)]
    + [2.8] * 10
)


def test_degradation_without_nan_is_diverged_and_fires_live() -> None:
    found = feed(watcher(), curve_of(DEGRADED))
    errors = [(s, c) for s, c, sev in fired(found) if sev == "error"]
    assert errors and errors[0][1] == "loss_degradation", fired(found)
    assert 40 <= errors[0][0] <= 60, "fired too late (or before the loss had really climbed)"
    d = diagnose_curve(curve_of(DEGRADED))
    assert d.verdict == "diverged" and d.evidence["cause"] == "degradation", d.summary
    finding = next(f for f in d.findings if f.code == "loss_degradation")
    assert 25 <= finding.evidence["min_step"] <= 32


def test_a_milder_climb_is_unstable() -> None:
    losses = falling(30, start=2.0, floor=1.2, tau=8, noise=0.01) + [
        round(1.2 + 0.01 * i, 4) for i in range(1, 31)
    ]
    d = diagnose_curve(curve_of(losses))  # ends near 1.5: 1.25x its minimum
    assert d.verdict == "unstable", (d.summary, serious(d))
    assert "loss_rising" in codes(d)


def test_eval_loss_ending_far_above_its_best_without_falling_train_is_diverged() -> None:
    losses = falling(50, start=2.0, floor=1.3, tau=10, noise=0.01) + noisy(50, 1.32, 0.01)
    evals = {10: 1.6, 20: 1.45, 30: 1.40, 40: 1.5, 50: 1.7, 60: 1.9, 70: 2.1, 80: 2.2, 90: 2.25, 100: 2.3}
    d = diagnose_curve(curve_of(losses, evals=evals))
    assert d.verdict == "diverged", (d.summary, serious(d))
    assert d.best_checkpoint is None or d.best_checkpoint.endswith("-30") or d.evidence["keep"]


# ----------------------------------------------------------------------------- (3) oscillation


def test_sustained_oscillation_at_a_high_level_is_unstable_not_flat() -> None:
    losses = [6.0 if i % 3 == 0 else 16.0 if i % 3 == 1 else 10.0 for i in range(60)]
    d = diagnose_curve(curve_of(losses))
    assert d.verdict == "unstable", (d.summary, serious(d))
    assert "oscillation" in codes(d)


def test_normal_per_step_noise_is_not_oscillation() -> None:
    d = diagnose_curve(curve_of(falling(200, noise=0.08, seed=4)))
    assert d.verdict == "healthy", (d.summary, serious(d))


# ----------------------------------------------------------------------------- (4) false alarms


def test_tiny_dataset_memorized_without_eval_and_one_grad_blip_is_healthy() -> None:
    losses = [round(2.5 * math.exp(-i / 12) + 0.001, 4) for i in range(100)]
    grads = [round(4.0 * math.exp(-i / 20) + 0.02, 4) for i in range(100)]
    grads[70] = 0.9  # one small blip, 10x+ its recent median
    d = diagnose_curve(curve_of(losses, grads, steps_per_epoch=10))
    assert d.verdict == "healthy", (d.summary, serious(d))


def test_eval_plateau_within_one_percent_of_best_is_not_overfitting() -> None:
    losses = falling(100, start=2.0, floor=0.9, tau=30, noise=0.01)
    evals = {20: 1.5, 40: 1.3, 60: 1.2, 70: 1.150, 80: 1.152, 90: 1.155, 100: 1.160}
    d = diagnose_curve(curve_of(losses, evals=evals))
    assert d.verdict == "healthy", (d.summary, serious(d))


def test_clear_eval_rise_is_still_overfitting() -> None:
    losses = falling(100, start=2.0, floor=0.6, tau=30, noise=0.01)
    evals = {20: 1.5, 40: 1.3, 60: 1.2, 70: 1.25, 80: 1.31, 90: 1.38, 100: 1.45}
    assert diagnose_curve(curve_of(losses, evals=evals)).verdict == "overfitting"


def test_eval_drifting_up_while_train_has_plateaued_too_is_not_overfitting() -> None:
    """Overfitting is train improving while eval worsens: a 5% eval drift with train flat is a plateau,
    even when one noisy train log between evals happens to be lower (train and eval at the same cadence)."""
    losses = falling(60, start=0.7, floor=0.3, tau=8, noise=0.0) + noisy(90, 0.30, 0.04, seed=3)
    evals = {
        s: max(0.29, 0.7 - 0.008 * s) + (0.015 * (s - 90) / 60 if s > 90 else 0.0) for s in range(10, 151, 10)
    }
    d = diagnose_curve(curve_of(losses, evals=evals))
    assert d.verdict == "healthy", (d.summary, serious(d))
    losses = falling(60, start=0.7, floor=0.3, tau=8, noise=0.0) + falling(90, 0.3, 0.15, tau=30, noise=0.0)
    assert diagnose_curve(curve_of(losses, evals=evals)).verdict == "overfitting"  # train fell: it is


def test_eval_degradation_that_train_later_outlearns_is_overfitting_not_divergence() -> None:
    """Eval 1.5x its best while train is still noisy (a live degradation), then train falls to ~0 as eval
    keeps rising: the model memorized the train set."""
    losses = noisy(60, 0.10, 0.005, seed=1) + falling(40, start=0.10, floor=0.005, tau=8, noise=0.0)
    evals = {s: 0.6 + 0.9 * s / 100 for s in range(10, 101, 10)}
    d = diagnose_curve(curve_of(losses, evals=evals))
    assert d.verdict == "overfitting", (d.summary, serious(d))
    degraded = [f for f in d.findings if f.code == "eval_degradation"]
    assert degraded and degraded[0].severity == "info" and "not a divergence" in degraded[0].title
    still = noisy(100, 0.10, 0.005, seed=1)  # train never falls: the same evals are a divergence
    assert diagnose_curve(curve_of(still, evals=evals)).verdict == "diverged"


def test_an_eval_before_the_first_train_log_compares_with_the_train_loss_after_it() -> None:
    losses = falling(9, start=0.9, floor=0.001, tau=1.5, noise=0.0)  # train logged every 50 steps
    evals = {s: 0.82 + 0.01 * i for i, s in enumerate(range(45, 451, 45))}  # every 45: the first at 45
    evals[450] = 1.29
    d = diagnose_curve(curve_of(losses, every=50, evals=evals))
    assert d.verdict == "overfitting", (d.summary, serious(d))


def test_memorization_that_eval_recovers_from_by_the_end_is_healthy() -> None:
    losses = falling(160, start=1.5, floor=0.0002, tau=15, noise=0.0)
    evals = {s: 0.63 for s in range(10, 161, 20)} | {90: 1.25, 110: 1.40, 130: 0.6, 150: 0.29, 160: 0.28}
    d = diagnose_curve(curve_of(losses, evals=dict(sorted(evals.items()))))
    assert d.verdict == "healthy", (d.summary, serious(d))
    assert any(f.code == "memorization" and f.severity == "info" for f in d.findings)


def test_grad_norm_nan_at_two_steps_with_a_smooth_loss_is_a_warning_and_healthy() -> None:
    losses = falling(80)
    grads: list[float | None] = [0.5] * 80
    grads[40] = grads[41] = math.nan
    d = diagnose_curve(curve_of(losses, grads))
    assert d.verdict == "healthy", (d.summary, serious(d))
    (warning,) = [f for f in d.findings if f.severity != "info"]
    assert warning.severity == "warning" and warning.step == 41 and "fp16" in " ".join(warning.causes)


def test_grad_norm_nan_that_goes_on_is_still_a_divergence() -> None:
    losses = falling(80)
    grads: list[float | None] = [0.5] * 40 + [math.nan] * 40
    assert diagnose_curve(curve_of(losses, grads)).verdict == "diverged"


# ----------------------------------------------------------------------------- evidence, NaN eval, JSON


def test_every_failure_verdict_keeps_evidence_and_a_checkpoint_reason() -> None:
    for curve in (
        curve_of(LR_01, LR_01_GRADS, lr=0.1),
        curve_of(DEGRADED),
        curve_of([1.9, 1.7, 1.6, 1.55, 1.5] + [0.0] * 25, [None] * 30),
    ):
        d = diagnose_curve(curve)
        assert d.verdict == "diverged"
        assert d.evidence["keep"] and d.evidence["loss_first"] is not None
        assert any(f.severity == "error" and f.evidence for f in d.findings)


def test_nan_eval_loss_with_finite_training_is_reported() -> None:
    losses = falling(60)
    d = diagnose_curve(curve_of(losses, evals={20: 1.8, 40: math.nan, 60: math.nan}))
    finding = next(f for f in d.findings if f.code == "eval_non_finite")
    assert finding.step == 40 and finding.severity == "warning"
    assert d.verdict != "diverged"


def test_doctor_json_is_strict_json_with_null_and_a_flag() -> None:
    losses = falling(20) + [math.nan, math.nan]
    d = diagnose_curve(curve_of(losses, evals={10: 1.9, 20: math.nan}))
    text = json.dumps(d.to_dict(), allow_nan=False)  # raises on a bare NaN
    data = json.loads(text)
    assert data["evidence"]["loss_last"] is None and data["evidence"]["loss_last_non_finite"] == "NaN"
    finding = next(f for f in data["findings"] if f["code"] == "non_finite")
    assert finding["evidence"]["loss"] is None and finding["evidence"]["loss_non_finite"] == "NaN"


@pytest.mark.parametrize("sigma", [0.1, 0.2])
def test_live_per_step_noise_of_small_batches_raises_no_error_and_stays_healthy(sigma: float) -> None:
    # Every optimizer step live, batch noise of 10-20% (lognormal) on a healthy decay: the monitor stops a
    # run on an error finding, so none may come from noise; post hoc the verdict is healthy.
    import random

    for seed in range(10):
        rng = random.Random(seed)
        losses = [(1.0 + 1.2 * math.exp(-s / 80)) * math.exp(rng.gauss(0, sigma)) for s in range(400)]
        grads = [0.5 * math.exp(rng.gauss(0, sigma)) for _ in range(400)]
        w = watcher(warmup_steps=12, total_steps=400)
        feed(w, curve_of(losses, grads))
        w.finish()
        assert not [f for f in w.findings if f.severity == "error"], (seed, fired({0: w.findings}))
        assert diagnose_curve(curve_of(losses, grads)).verdict == "healthy", seed


def test_doctor_command_prints_strict_json(tmp_path) -> None:
    import subprocess
    import sys
    from pathlib import Path

    state = Path(__file__).parents[1] / "fixtures" / "trainer_states" / "nan_loss.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tunewise.cli", "doctor", str(state), "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr  # an error finding

    def refuse(constant: str) -> None:
        raise ValueError(f"bare {constant} in doctor --json")

    data = json.loads(proc.stdout, parse_constant=refuse)
    assert data["verdict"] == "diverged" and data["evidence"]["loss_last_non_finite"] == "NaN"


# ----------------------------------------------------------------------------- (5) one-step events


def test_one_overflow_step_with_a_high_loss_on_a_falling_curve_is_healthy() -> None:
    """A grad norm of inf at one log whose own batch loss is high (1.66 on a curve at 0.01), the loss back on
    its curve at the next log: fp16's scaler skipped that update, nothing was damaged (LABELS H1/H2)."""
    losses = falling(60, start=0.3, floor=0.001, tau=6, noise=0.0)
    grads: list[float | None] = [0.05] * 60
    losses[30], grads[30] = 1.66, math.inf
    d = diagnose_curve(curve_of(losses, grads))
    assert d.verdict == "healthy", (d.summary, serious(d))
    overflow = next(f for f in d.findings if f.code == "non_finite")
    assert overflow.severity == "info" and "overflow" in overflow.title
    # The same overflow followed by a loss that stays up is not a skipped step: not healthy.
    losses[31:36] = [1.5, 1.4, 1.45, 1.5, 1.42]
    assert diagnose_curve(curve_of(losses, grads)).verdict != "healthy"


def test_tiny_losses_that_repeat_by_rounding_while_grad_norms_move_are_not_unchanged_weights() -> None:
    """Losses logged to 4 decimals at ~0.0013 take three values, so one epoch's losses 'repeat' the last
    one's by chance; the grad norms, different at every repeat, show the weights are moving (the same batch
    through the same weights would give the same gradient too). The eval rise is overfitting, not flat."""
    per_epoch = 20
    losses = [round(0.03 * math.exp(-i / 40) + 0.0015, 4) for i in range(200)]
    losses += [(0.0013, 0.0014, 0.0013, 0.0012)[i % 4] for i in range(100)]  # the same at each place
    grads = [round(0.02 + 0.01 * ((i * 13) % 7), 4) for i in range(300)]  # period 7: moves every epoch
    train = [
        TrainPoint(i + 1, loss, g, 4e-5, (i + 1) / per_epoch)
        for i, (loss, g) in enumerate(zip(losses, grads, strict=True))
    ]
    evals = [0.0042, 0.0031, 0.0027, 0.0023, 0.0020, 0.0018, 0.0017, 0.0016, 0.0015, 0.00144]
    evals += [0.0018, 0.0042, 0.0028, 0.0081, 0.0436]
    curve = Curve(train, [EvalPoint(20 * (k + 1), x, k + 1.0) for k, x in enumerate(evals)], "test")
    d = diagnose_curve(curve)
    assert "weights_unchanged" not in codes(d), serious(d)
    assert d.verdict == "overfitting", (d.summary, serious(d))
    # The same losses with grad norms that repeat too are unchanged weights.
    same = [TrainPoint(p.step, p.loss, grads[(p.step - 1) % per_epoch], p.lr, p.epoch) for p in train]
    assert "weights_unchanged" in codes(diagnose_curve(Curve(same, [], "test")))


def test_one_batch_spike_on_a_curve_whose_batches_swing_widely_is_not_instability() -> None:
    """A BERT-like classifier at a noisy ~0.06 (batches between 0.02 and 0.12: a 10-90% range over 50% of
    the median) logs one batch at 1.16 and is back at once: one batch of a heavy-tailed curve (LABELS H4).
    The same spike on a quiet curve stands out of its noise and still counts (unstable)."""
    import random

    rng = random.Random(7)
    noisy_tail = [round(0.06 * math.exp(rng.gauss(0, 0.45)), 4) for _ in range(300)]
    losses = falling(40, start=0.63, floor=0.06, tau=8, noise=0.0) + noisy_tail
    losses[200] = 1.16
    d = diagnose_curve(curve_of(losses, every=10))
    assert d.verdict == "healthy", (d.summary, serious(d))
    spike = next(f for f in d.findings if f.code == "loss_spike")
    assert spike.severity == "info" and "one batch" in spike.title
    quiet = falling(40, start=0.63, floor=0.06, tau=8, noise=0.0) + noisy(300, 0.06, 0.002, seed=7)
    quiet[200] = 1.16
    assert diagnose_curve(curve_of(quiet, every=10)).verdict == "unstable"
    # Two batches in a row far above the curve are no single batch: they still count.
    losses[201] = 0.9
    assert diagnose_curve(curve_of(losses, every=10)).verdict == "unstable"


# ----------------------------------------------------------------------------- fresh4/fresh5's misses


def test_a_grad_norm_storm_whose_loss_blip_came_back_at_once_is_healthy() -> None:
    """A Qwen LoRA logging every 5 steps: grad norms jump to 110x their median while the loss blips to 2.3x
    its median for one log and is back at once (Miguel-Alessio/qwen-chess-lora). The gradient only matters
    through what it did to the loss: nothing lasting. The same storm with a loss that leaves its curve for
    good (a climb to 2.5x that stays) is no blip."""
    losses = falling(400, start=1.2, floor=0.6, tau=60, noise=0.01)
    grads = [0.37] * 400
    losses[200], grads[199], grads[200], grads[202] = 1.5, 12.0, 41.0, 20.0
    d = diagnose_curve(curve_of(losses, grads, every=5))
    assert d.verdict == "healthy", (d.summary, serious(d))
    assert any(f.code == "grad_norm_spike" and "came back at once" in f.title for f in d.findings)
    stays = losses[:200] + [1.6] * 200
    assert diagnose_curve(curve_of(stays, grads, every=5)).verdict != "healthy"


def test_one_batch_over_the_first_steps_explosion_line_is_unstable_however_noisy_the_curve() -> None:
    """A forecaster's per-100-iteration loss swings between 0.13 and 0.47 and logs one 2.14, back at once
    (Secilia-Cxy/SOFTS#10): 7x the 0.28 it started at and over a nat above it, more than any batch's noise
    (LABELS R6a). The same curve's batches under that line stay noise (the test above)."""
    import random

    rng = random.Random(3)
    losses = [round(0.22 * math.exp(rng.gauss(0, 0.4)), 4) for _ in range(40)]
    losses[:3] = [0.13, 0.28, 0.32]
    losses[25] = 2.14
    d = diagnose_curve(curve_of(losses, every=100))
    assert d.verdict == "unstable", (d.summary, serious(d))
    assert next(f for f in d.findings if f.code == "loss_spike").severity == "warning"
    losses[25] = 0.8  # 2.9x the start: under the line, one batch of a noisy curve
    spike = next(f for f in diagnose_curve(curve_of(losses, every=100)).findings if f.code == "loss_spike")
    assert spike.severity == "info" and "one batch" in spike.title


def test_one_eval_up_at_the_end_is_a_tick_not_a_rise_nor_a_degradation() -> None:
    """A wav2vec2 classifier's eval swings 0.04-0.47 on its way down; only its last eval sits above the best
    (1.4x; 1.5x for a Flan-T5 at 0.0014): one eval is a tick (LABELS R5's rule), not eval_rising nor an
    eval_degradation. Two evals above the best, the run ending there, count."""
    losses = falling(140, start=0.7, floor=0.05, tau=20, noise=0.0)
    evals = {10 * k: round(0.5 * math.exp(-k / 3) + 0.04, 4) for k in range(1, 14)}
    evals[140] = round(evals[130] * 1.6, 4)
    d = diagnose_curve(curve_of([*losses[:139], 0.06], evals=evals))
    assert d.verdict == "healthy", (d.summary, serious(d))
    evals[130], evals[140] = round(evals[120] * 1.6, 4), round(evals[120] * 1.7, 4)
    d = diagnose_curve(curve_of([*losses[:139], 0.06], evals=evals))
    assert d.verdict in ("diverged", "unstable"), (d.summary, serious(d))


def test_a_short_log_that_learned_then_climbed_back_diverged() -> None:
    """8 logs of a Qwen3-4B QLoRA (paiml/entrenar#274): 15.5 -> 1.43, then 5.8, 7.1, 10.0 with the grad norm
    at 70 when the user killed it. Too short for the smoothed degradation test, not above its start: the
    climb from its low is the divergence. A short log that never fell from its start has nothing to lose."""
    losses = [15.5, 13.0, 3.8, 2.39, 1.43, 5.82, 7.05, 10.03]
    d = diagnose_curve(curve_of(losses, [42.7, 14.0, 24.4, 7.1, 7.7, 15.6, 15.3, 70.7], every=55))
    assert d.verdict == "diverged" and "loss_degradation" in codes(d), (d.summary, serious(d))
    assert diagnose_curve(curve_of([0.06, 0.11, 0.13, 0.10, 0.15, 0.21], every=10)).verdict != "diverged"


def test_a_zero_loss_after_one_positive_log_is_too_little_to_call_a_nan() -> None:
    """2 logs, 2.04 then 0.0, no grad norm (huggingface/trl#940: a collator that left no label): a hidden
    NaN and nothing to train read the same, so 2 logs are insufficient data; with 5 logs of 0.0 after it
    the hidden NaN stands (LABELS R2c); a logged NaN is a divergence however short the log."""
    d = diagnose_curve(curve_of([2.04, 0.0], [None, None]))
    assert d.verdict == "insufficient-data", (d.summary, serious(d))
    assert diagnose_curve(curve_of([2.04] + [0.0] * 5, [None] * 6)).verdict == "diverged"
    assert diagnose_curve(curve_of([2.04, math.nan], [0.5, math.nan])).verdict == "diverged"


def test_a_climb_the_run_later_outlearned_is_healthy_but_one_that_only_came_back_is_not() -> None:
    """A toxicity classifier: 0.14 -> 0.097, a climb to ~0.2 over 1,100 steps, back by step 2,400, then down
    to 0.0005 (ser1q): a hard stretch on the way down, not instability. The same climb after which the loss
    only returns to its old minimum still counts."""
    down = [round(0.14 - 0.043 * i / 3, 4) for i in range(4)]
    bump = [0.12, 0.15, 0.18, 0.2, 0.21, 0.2, 0.2, 0.21, 0.2, 0.2, 0.19, 0.2, 0.18, 0.15, 0.12, 0.1]
    later = [round(0.09 * math.exp(-i / 15), 4) for i in range(80)]
    d = diagnose_curve(curve_of(down + bump + later, every=100))
    assert d.verdict == "healthy", (d.summary, serious(d))
    back = down + bump + [0.125, 0.122, 0.124, 0.126, 0.123] * 16  # back to its old smoothed low (0.118)
    assert diagnose_curve(curve_of(back, every=100)).verdict == "unstable"


def test_the_healthy_summary_does_not_say_fell_for_a_loss_that_rose() -> None:
    """A mid-run fragment judged healthy whose last log sits above its first (keras-team/keras#6102) was
    summed up as "loss fell from 92863873 ... to 110019400"."""
    ev = {"loss_first": 9.3e7, "first_step": 48, "loss_last": 1.1e8, "last_step": 63, "train_points": 16}
    assert _summarize("healthy", [], ev).startswith("Healthy: loss went from 93000000")
    assert _summarize("healthy", [], {**ev, "loss_last": 5e7}).startswith("Healthy: loss fell from 93000000")


def test_a_memorized_per_example_log_with_real_zeros_is_neither_a_hidden_nan_nor_unchanged_weights() -> None:
    """A LoRA chat fine-tune at batch size 1, logged every step for 30 epochs over 517 examples, no grad norm
    (GU-DY/chattest): per-example losses of 0.1-0.2 next to memorized ones that round to 0.0, and late in the
    run 0.0 almost everywhere with a 0.0001 here and there. A 0.0 after 0.105 is then a real batch (the
    curve's recent range reaches 0), not a NaN the logging filter hid; and a 0.0001 that matches the one an
    epoch before, between zeros, is no row of repeated losses. On a curve that never came near 0, the
    same 0.0 is a hidden NaN."""
    import random

    rng = random.Random(5)
    per_epoch = 20
    early = [round(2.0 * math.exp(-i / 30) + abs(rng.gauss(0, 0.05)), 4) for i in range(200)]
    mixed = [(0.0, 0.0008, 0.105, 0.0, 0.2073, 0.0002, 0.0013, 0.0)[i % 8] for i in range(200)]
    late = [{0: 0.0001, 5: 0.0002, 10: 0.0001, 15: 0.0003}.get(i % per_epoch, 0.0) for i in range(200)]
    losses = early + mixed + late
    train = [TrainPoint(i + 1, x, None, 1e-4, (i + 1) / per_epoch) for i, x in enumerate(losses)]
    d = diagnose_curve(Curve(train, [], "test"))
    assert d.verdict == "healthy", (d.summary, serious(d))
    assert not {"non_finite", "weights_unchanged"} & codes(d)
    calm = [round(0.5 + 1.5 * math.exp(-i / 30) + abs(rng.gauss(0, 0.05)), 4) for i in range(200)]
    calm[150] = 0.0
    hidden = diagnose_curve(
        Curve([TrainPoint(i + 1, x, None, 1e-4, None) for i, x in enumerate(calm)], [], "t")
    )
    assert "non_finite" in codes(hidden)


# ----------------------------------------------------------------------------- fresh9's misses


def test_a_blow_up_before_the_noise_is_known_is_judged_against_the_running_minimum() -> None:
    """A Keras run logged per epoch (piaic AI-Q2 #15): 9.45 -> 0.67 in 8 epochs, then 2.36 and 6.05, then
    back to 0.39. Eight calm points are too few to know the noise, but 6.05 is past the explosion line of
    the running minimum (5x and +3): beyond any batch's noise, an explosion that came back (unstable).
    Below that line the same short log is not judged (a jump to 3x and back is healthy)."""
    head = [9.45, 8.84, 1.59, 1.17, 0.85, 0.78, 0.67, 0.70]
    d = diagnose_curve(curve_of([*head, 2.36, 6.05, 0.62, 0.48, 0.39]))
    assert d.verdict == "unstable", (d.summary, serious(d))
    blow_up = next(f for f in d.findings if f.code == "loss_explosion")
    assert blow_up.step == 10 and blow_up.evidence["running_min"] == pytest.approx(0.78)
    # Found live, at the step it happened.
    found = feed(watcher(), curve_of([*head, 2.36, 6.05]))
    assert (10, "loss_explosion", "error") in fired(found), fired(found)
    # Boundary: 3.5 is 4.5x the running minimum (under 5x): not past the line, and not judged.
    assert diagnose_curve(curve_of([*head, 2.36, 3.5, 0.62, 0.48, 0.39])).verdict == "healthy"
    # Boundary: +3 above the minimum matters too (a small-loss run: 5x of 0.1 is only +0.4).
    small = [2.0, 1.2, 0.5, 0.2, 0.12, 0.1, 0.09, 0.1]
    assert diagnose_curve(curve_of([*small, 0.6, 0.11, 0.1, 0.09])).verdict == "healthy"
