"""The live doctor on real tiny trainings: each failure is made to happen, then what it said is checked.

Every run here trains the tiny model for real (no synthetic curves): a rate that diverges, the same in
recover mode, labels that are all masked, a LoRA rate far too low, 8 examples for many epochs, and a
healthy run. Each test compares the monitor's live findings (findings.jsonl) with the metrics it wrote
(metrics.jsonl) and with the post-hoc doctor (`diagnose_path`, what `tunewise doctor` prints).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from conftest import read_jsonl, tiny_overrides, write_subset
from safetensors.torch import load_file

from tunewise.config import load_config
from tunewise.doctor.codes import DIVERGED_CODES
from tunewise.doctor.diagnose import diagnose_path, render_diagnosis
from tunewise.doctor.findings import read_findings
from tunewise.training.run import train

# Small, fast runs: batch 2, no checkpoint or eval unless a test asks for one.
FAST = {
    "training.per_device_train_batch_size": 2,
    "training.gradient_accumulation_steps": 1,
    "training.eval_steps": 1000,
    "training.save_steps": 1000,
    "training.load_best_model_at_end": False,
}
# SGD with momentum 0.9 and no clipping at a constant lr 0.9, a rate the config accepts: its steps grow
# toward lr / (1 - momentum) = 9, and full fine-tuning of the tiny model blows up (loss 10.8 -> 24 at
# step 6 -> 111 at step 7); plain SGD at lr 0.9 is stable.
SGD = {
    "model.method": "full",
    "training.optim": "sgd",
    "training.optim_args": "momentum=0.9",
    "training.learning_rate": 0.9,
    "training.max_grad_norm": 0,
    "training.warmup_steps": 0,
    "training.lr_scheduler_type": "constant",
    "training.per_device_train_batch_size": 4,
    "training.gradient_accumulation_steps": 2,
    "training.eval_steps": 1000,
    "training.save_steps": 1000,
    "training.load_best_model_at_end": False,
}


def _config(model_dir: Path, data: dict[str, Path], tmp_path: Path, extra: dict):
    return load_config(None, tiny_overrides(model_dir, data, tmp_path / "runs", extra))


def _train_steps(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["type"] == "train"]


def _finite_step(record: dict) -> bool:
    grad_norm = record["grad_norm"]
    return math.isfinite(record["loss"]) and (grad_norm is None or math.isfinite(grad_norm))


def _all_finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(path).values())


def _serious(findings) -> list:
    return [f for f in findings if f.severity in ("warning", "error")]


def test_divergence_is_found_at_its_step_and_weights_stay_finite(tiny_model_dir, small_data, tmp_path):
    cfg = _config(
        tiny_model_dir,
        small_data,
        tmp_path,
        {**SGD, "name": "diverge", "training.max_steps": 10, "training.save_steps": 2},
    )
    result = train(cfg)
    assert result.status == "diverged"
    steps = _train_steps(result.run_dir)
    # An explosion is a divergence whether or not it is NaN: the run stops at the step of the first
    # error of the diverged family (a finite blow-up comes before any NaN here).
    errors = [
        f
        for f in read_findings(result.run_dir / "findings.jsonl")
        if f.code in DIVERGED_CODES and f.severity == "error"
    ]
    assert errors, "no divergence finding"
    first_bad = errors[0].step
    assert steps[-1]["step"] == first_bad, "the monitor did not stop at the divergence's step"
    first_rise = next(r["step"] for r in steps if not _finite_step(r) or r["loss"] > 3 * steps[0]["loss"])
    assert first_bad == first_rise
    assert errors[0].fixes[0].change == "training.learning_rate=9.0e-02"  # lr 0.9 too high: a tenth, first
    assert result.numbers["diverged_at"] == first_bad
    # The non-finite step's update was skipped: the saved model and checkpoints hold finite weights.
    assert _all_finite(result.run_dir / "model" / "model.safetensors")
    checkpoints = list(result.run_dir.glob("checkpoint-*/model.safetensors"))
    assert checkpoints and all(_all_finite(p) for p in checkpoints)
    assert diagnose_path(result.run_dir).verdict == "diverged"


def test_recover_mode_lowers_the_rate_and_completes(tiny_model_dir, small_data, tmp_path):
    # Calm for 5 steps (checkpoint-4), then the loss climbs (24 at step 6) and explodes at step 7.
    extra = {
        **SGD,
        "name": "recover",
        "training.max_steps": 8,
        "training.save_steps": 2,
        "doctor.on_divergence": "recover",
    }
    result = train(_config(tiny_model_dir, small_data, tmp_path, extra))
    assert result.status == "completed", result.error
    assert result.global_step == 8
    saved = json.loads((result.run_dir / "result.json").read_text())
    assert saved["recovery_changes"][0] == "training.learning_rate=0.09"
    recoveries = [f for f in read_findings(result.run_dir / "findings.jsonl") if f.code == "recovery"]
    assert recoveries and "training.learning_rate=0.09" in recoveries[0].title
    assert recoveries[0].fixes[0].change == "training.learning_rate=0.09"
    # metrics.jsonl: the diverged attempt, then the steps after the restart (the step count goes back).
    steps = _train_steps(result.run_dir)
    restart = next(i for i in range(1, len(steps)) if steps[i]["step"] <= steps[i - 1]["step"])
    before, after = steps[:restart], steps[restart:]
    assert before[-1]["learning_rate"] == 0.9  # stopped at the explosion (finite or not), at the high rate
    # It went back to the last checkpoint saved before the loss began to climb, not the one just before NaN.
    climb = next(r["step"] for r in before if not _finite_step(r) or r["loss"] > 2 * before[0]["loss"])
    assert after[0]["step"] - 1 < climb - 1 and f"checkpoint-{after[0]['step'] - 1}" in recoveries[0].title
    # The new rate took effect on the resumed (constant) schedule from the first step after the restart.
    assert all(math.isclose(r["learning_rate"], 0.09) for r in after)
    assert after[-1]["step"] == 8 and all(_finite_step(r) for r in after)
    assert _all_finite(result.run_dir / "model" / "model.safetensors")


def test_all_labels_masked_is_nothing_to_learn_not_a_divergence(tiny_model_dir, small_data, tmp_path):
    # 32 tokens hold only the system prompt and the question: every assistant response is cut off.
    cfg = _config(
        tiny_model_dir,
        small_data,
        tmp_path,
        {**FAST, "name": "masked", "data.max_seq_length": 32, "training.max_steps": 30},
    )
    result = train(cfg, force=True)  # --force trains examples the check would refuse
    steps = _train_steps(result.run_dir)
    assert steps and all(r["trained_tokens"] == 0 and math.isnan(r["loss"]) for r in steps)
    assert result.status == "stopped" and result.global_step == 10, (result.status, result.global_step)
    assert "no token was trained in 10 steps" in result.error
    findings = read_findings(result.run_dir / "findings.jsonl")
    assert not [f for f in findings if f.code == "non_finite"], "0/0 from masked labels called a divergence"
    (error,) = [f for f in findings if f.severity == "error"]
    assert error.code == "no_trainable_tokens" and error.evidence["trained_tokens"] == 0
    assert error.causes[0].startswith("labels are masked")
    assert error.fixes[0].change == "data.train_on=assistant" and "tunewise inspect" in error.fixes[0].why
    # The doctor, after the fact, on the run directory.
    diagnosis = diagnose_path(result.run_dir)
    assert diagnosis.verdict == "flat", diagnosis.summary
    text = render_diagnosis(diagnosis)
    assert "1. labels are masked" in text and "1. data.train_on=assistant" in text


def test_lora_rate_too_low_is_flat_with_the_rate_ranked_first(tiny_model_dir, small_data, tmp_path):
    cfg = _config(
        tiny_model_dir,
        small_data,
        tmp_path,
        {**FAST, "name": "low", "training.max_steps": 20, "training.learning_rate": 1e-6},
    )
    result = train(cfg)
    assert result.status == "completed"
    # The end-of-run check ran live (on_train_end): a flat error at the last step, also in result.json.
    live = read_findings(result.run_dir / "findings.jsonl")
    flat = [f for f in live if f.code == "flat" and f.severity == "error"]
    assert flat and flat[0].step == 20, [(f.step, f.code) for f in live]
    assert "too low" in flat[0].causes[0] and flat[0].fixes[0].change == "training.learning_rate=1.0e-05"
    assert any(f["code"] == "flat" for f in result.numbers["findings"])
    diagnosis = diagnose_path(result.run_dir)
    assert diagnosis.verdict == "flat", diagnosis.summary
    text = render_diagnosis(diagnosis)
    assert "likely causes (most likely first):\n  1. learning rate 1.0e-06 is too low" in text


def test_tiny_dataset_many_epochs_overfits_and_keeps_the_best_checkpoint(tiny_model_dir, tmp_path):
    data = write_subset(tmp_path / "data8", n_train=8, n_val=4)
    extra = {
        "name": "overfit",
        "model.method": "full",
        "training.learning_rate": 3e-2,
        "training.max_steps": 14,
        "training.per_device_train_batch_size": 8,
        "training.gradient_accumulation_steps": 1,
        "training.eval_steps": 2,
        "training.save_steps": 2,
        "training.save_total_limit": 1,
        "training.lr_scheduler_type": "constant",
        "training.warmup_steps": 0,
    }
    result = train(_config(tiny_model_dir, data, tmp_path, extra))  # 14 epochs of one step each
    assert result.status == "completed"
    live = read_findings(result.run_dir / "findings.jsonl")
    assert any(f.code == "overfitting" for f in live), [(f.step, f.code) for f in live]
    diagnosis = diagnose_path(result.run_dir)
    assert diagnosis.verdict == "overfitting", diagnosis.summary
    best = result.numbers["best_checkpoint"]
    evals = [r for r in read_jsonl(result.run_dir / "metrics.jsonl") if r["type"] == "eval"]
    lowest = min(evals, key=lambda r: r["eval_loss"])
    assert best == diagnosis.best_checkpoint == f"checkpoint-{lowest['step']}" and lowest["step"] < 14
    assert (result.run_dir / best / "model.safetensors").is_file()


def test_healthy_run_has_no_warnings(tiny_model_dir, small_data, tmp_path):
    extra = {
        **FAST,
        "name": "healthy",
        "model.method": "full",
        "training.learning_rate": 3e-3,
        "training.max_steps": 30,
        "training.eval_steps": 10,
    }
    result = train(_config(tiny_model_dir, small_data, tmp_path, extra))
    assert result.status == "completed"
    steps = _train_steps(result.run_dir)
    assert steps[-1]["loss"] < 0.9 * steps[0]["loss"]  # it really learned
    assert _serious(read_findings(result.run_dir / "findings.jsonl")) == []
    assert result.numbers["findings"] == []
    diagnosis = diagnose_path(result.run_dir)
    assert diagnosis.verdict == "healthy", diagnosis.summary
    assert _serious(diagnosis.findings) == [] and diagnosis.exit_code() == 0
