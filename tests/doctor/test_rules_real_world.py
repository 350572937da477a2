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

from tunewise.doctor.diagnose import diagnose_curve

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
