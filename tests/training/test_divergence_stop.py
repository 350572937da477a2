"""An explosion is a divergence whether or not it is NaN: the live monitor stops (or rolls back) at its step.

Every run here trains for real: a tiny Llama at a rate that blows its loss up within the first steps
(finite numbers, no NaN), then the embedded SmolLM2 the way issue #14 found it (LoRA, batch 4, constant
lr 0.1, no warmup, clipping 0.3). Each test checks the step the doctor named against the step where the
loss left its start (read from metrics.jsonl, the numbers alone), that nothing was trained after it
(`doctor.on_divergence: stop`), or that the run went back to weights from before it and went on at a
tenth of the rate (`recover`). A last test drives the monitor with each code of the "diverged" family.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import read_jsonl, tiny_overrides, write_subset
from transformers import TrainerControl, TrainerState

from tunewise import rundir
from tunewise.config import load_config
from tunewise.doctor.codes import CODES, DIVERGED_CODES
from tunewise.doctor.diagnose import diagnose_path
from tunewise.doctor.findings import Finding, Fix, read_findings
from tunewise.training.monitor import StepMonitor, StepRecord
from tunewise.training.run import train

# Full fine-tuning of the tiny model with Adam at a constant 0.9, no clipping, no warmup: the loss goes
# 10.8 -> 20 -> 104 (ten times its start at step 3) and stays around 30; nothing is NaN.
EXPLODES = {
    "model.method": "full",
    "training.optim": "adamw_torch",
    "training.learning_rate": 0.9,
    "training.max_grad_norm": 0,
    "training.warmup_steps": 0,
    "training.lr_scheduler_type": "constant",
    "training.per_device_train_batch_size": 4,
    "training.gradient_accumulation_steps": 1,
    "training.logging_steps": 1,
    "training.max_steps": 12,
    "training.eval_steps": 1000,
    "training.save_steps": 1000,
    "training.load_best_model_at_end": False,
}
# The issue's run on the real model: LoRA on a chat set, batch 4, constant lr 0.1, no warmup, clipping 0.3.
ISSUE = {
    "model.name": "smollm2-135m-instruct",
    "model.method": "lora",
    "data.max_seq_length": 256,
    "training.optim": "adamw_torch",
    "training.learning_rate": 0.1,
    "training.lr_scheduler_type": "constant",
    "training.warmup_steps": 0,
    "training.max_grad_norm": 0.3,
    "training.per_device_train_batch_size": 4,
    "training.gradient_accumulation_steps": 1,
    "training.gradient_checkpointing": False,
    "training.logging_steps": 1,
    "training.eval_steps": 1000,
    "training.save_steps": 1000,
    "training.load_best_model_at_end": False,
    "training.report_to": "none",
}
LEFT = 2.0  # the loss "left its start": above this many times the step-1 loss (or not finite)


def _train_steps(run_dir: Path) -> list[dict]:
    return rundir.train_records(read_jsonl(run_dir / rundir.METRICS))


def _left_start(steps: list[dict]) -> int | None:
    """The first step whose loss is above LEFT x the first step's loss, or not finite."""
    start = steps[0]["loss"]
    return next((r["step"] for r in steps if not math.isfinite(r["loss"]) or r["loss"] > LEFT * start), None)


def _divergence(run_dir: Path) -> Finding:
    """The first error of the "diverged" family in findings.jsonl."""
    found = [f for f in read_findings(run_dir / rundir.FINDINGS) if f.severity == "error"]
    return next(f for f in found if f.code in DIVERGED_CODES)


def _attempts(steps: list[dict]) -> list[list[dict]]:
    """metrics.jsonl split where the step count goes back (a recovery restarted the run)."""
    runs: list[list[dict]] = [[]]
    for record in steps:
        if runs[-1] and record["step"] <= runs[-1][-1]["step"]:
            runs.append([])
        runs[-1].append(record)
    return runs


def _check_stopped_at_the_explosion(result, run_dir: Path) -> Finding:
    """The assertions every stopped run shares; returns the finding that stopped it."""
    assert result.status == "diverged", (result.status, result.error)
    steps = _train_steps(run_dir)
    finding = _divergence(run_dir)
    left = _left_start(steps)
    assert left is not None, [r["loss"] for r in steps]
    assert finding.step == left, (finding.step, left, [round(r["loss"], 2) for r in steps])
    # Stopped there: no step after it in metrics.jsonl, and result.json agrees.
    assert steps[-1]["step"] == finding.step == result.global_step == result.numbers["diverged_at"]
    saved = rundir.read_json_object(run_dir / rundir.RESULT)
    assert saved["status"] == "diverged" and saved["diverged_at"] == finding.step
    # The printed "why" line says where it stopped and what to change.
    assert f"stopped at step {finding.step}" in result.error
    assert finding.fixes[0].change and finding.fixes[0].change in result.error
    assert diagnose_path(run_dir).verdict == "diverged"
    return finding


def test_an_explosion_in_the_first_steps_stops_the_run_at_its_step(tiny_model_dir, small_data, tmp_path):
    cfg = load_config(
        None, tiny_overrides(tiny_model_dir, small_data, tmp_path / "runs", {**EXPLODES, "name": "boom"})
    )
    result = train(cfg)
    finding = _check_stopped_at_the_explosion(result, result.run_dir)
    steps = _train_steps(result.run_dir)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in steps), "not an explosion"
    assert finding.code == "loss_explosion" and finding.step < EXPLODES["training.max_steps"]
    assert finding.fixes[0].change == "training.learning_rate=9.0e-02"  # lr too high is ranked first
    # No checkpoint of the exploded weights is left for `--resume` to pick up.
    assert rundir.resumable(result.run_dir)[0] is None
    # plan.json tells the doctor the vocabulary size (ln of it: the loss of a model that knows nothing).
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    assert rundir.read_json_object(result.run_dir / rundir.PLAN)["vocab_size"] == vocab


def test_recover_rolls_back_before_the_explosion_and_goes_on_at_a_tenth_of_the_rate(
    tiny_model_dir, small_data, tmp_path
):
    extra = {**EXPLODES, "name": "boom-recover", "doctor.on_divergence": "recover"}
    cfg = load_config(None, tiny_overrides(tiny_model_dir, small_data, tmp_path / "runs", extra))
    result = train(cfg)
    assert result.status == "completed", result.error
    assert result.global_step == EXPLODES["training.max_steps"]
    assert result.numbers["recovery_changes"] == ["training.learning_rate=0.09"]
    first, second = _attempts(_train_steps(result.run_dir))
    (recovery,) = [f for f in read_findings(result.run_dir / rundir.FINDINGS) if f.code == "recovery"]
    # The first attempt ended at the explosion, the step where its loss left its start.
    assert first[-1]["step"] == _left_start(first) == recovery.step
    # No checkpoint came before it: the run went back to the initial weights, at lr 0.9 / 10.
    assert "from the initial weights" in recovery.title
    assert second[0]["step"] == 1 and second[0]["loss"] == pytest.approx(first[0]["loss"], rel=1e-3)
    assert all(r["learning_rate"] == pytest.approx(0.09) for r in second)
    assert _left_start(second) is None and second[-1]["step"] == EXPLODES["training.max_steps"]
    after = [f for f in read_findings(result.run_dir / rundir.FINDINGS) if f.step and f.severity == "error"]
    assert [f.code for f in after if f.code in DIVERGED_CODES] == ["loss_explosion"]  # the first attempt's


class _Watcher:
    """A CurveWatcher stand-in that raises one given finding at one step."""

    def __init__(self, finding: Finding):
        self.finding = finding

    def observe_train(self, step: int, *args, **kwargs) -> list[Finding]:
        return [self.finding] if step == self.finding.step else []

    def finish(self) -> list[Finding]:
        return []

    def trouble_began(self, step: int) -> int:
        return step


class _Trainer:
    def __init__(self) -> None:
        self.step_record = StepRecord()


def _monitor_stops(code: str, severity: str, at: int = 3, steps: int = 6) -> int | None:
    """Feed a StepMonitor `steps` steps (nothing recorded: loss 0.0, finite) whose doctor raises (code,
    severity) at step `at`; the step where the monitor stopped training, or None."""
    finding = Finding(
        at, severity, code, f"{code} at step {at}", {}, [], [Fix("training.learning_rate=1e-05", "")]
    )
    monitor = StepMonitor(_Trainer(), None, _Watcher(finding))  # type: ignore[arg-type]
    state, control = TrainerState(), TrainerControl()
    for step in range(1, steps + 1):
        state.global_step, state.epoch = step, step / steps
        monitor.on_step_end(None, state, control)  # type: ignore[arg-type]
        if control.should_training_stop:
            assert monitor.diverged_at == step and monitor.divergence is finding
            return step
    assert monitor.diverged_at is None
    return None


@pytest.mark.parametrize("code", sorted(c for c in DIVERGED_CODES if "error" in CODES[c].severities))
def test_every_error_of_the_diverged_family_stops_the_run_at_its_step(code):
    assert _monitor_stops(code, "error") == 3


@pytest.mark.parametrize("code", sorted(c for c in DIVERGED_CODES if "warning" in CODES[c].severities))
def test_a_warning_of_the_diverged_family_does_not_stop_the_run(code):
    assert _monitor_stops(code, "warning") is None


@pytest.mark.parametrize(
    "code",
    sorted(
        c
        for c, v in CODES.items()
        if "error" in v.severities and c not in DIVERGED_CODES and c != "no_trainable_tokens"
    ),
)
def test_an_error_outside_the_diverged_family_is_not_a_divergence(code):
    assert _monitor_stops(code, "error") is None


# ----------------------------------------------------------------------------- the real model


def _issue_config(tmp_path: Path, extra: dict):
    data = write_subset(tmp_path / "data", n_train=200, n_val=4, n_test=4)
    overrides = {**ISSUE, "output_dir": str(tmp_path / "runs"), "data.train": str(data["train"]), **extra}
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


@pytest.mark.slow
def test_smollm2_lora_at_lr_0_1_stops_where_the_loss_leaves_its_start(tmp_path):
    result = train(_issue_config(tmp_path, {"name": "issue-stop", "training.max_steps": 20}))
    finding = _check_stopped_at_the_explosion(result, result.run_dir)
    assert finding.step <= 5, "the explosion of issue #14 came within the first steps"
    assert math.isfinite(_train_steps(result.run_dir)[-1]["loss"])  # an explosion, not a NaN


@pytest.mark.slow
def test_smollm2_lora_at_lr_0_1_in_recover_mode_rolls_back_and_continues_lower(tmp_path):
    extra = {"name": "issue-recover", "training.max_steps": 3, "doctor.on_divergence": "recover"}
    result = train(_issue_config(tmp_path, extra))
    attempts = _attempts(_train_steps(result.run_dir))
    recoveries = [f for f in read_findings(result.run_dir / rundir.FINDINGS) if f.code == "recovery"]
    assert len(recoveries) == len(attempts) - 1 >= 1
    # The first attempt stopped at the explosion, where its loss left its start, and rolled back.
    assert attempts[0][-1]["step"] == _left_start(attempts[0]) == recoveries[0].step
    assert result.numbers["recovery_changes"][0] == "training.learning_rate=0.01"
    assert attempts[1][0]["step"] == 1 and attempts[1][0]["learning_rate"] == pytest.approx(0.01)
    # It went on at the lower rate (and, if that exploded too, with warmup) to the end of the run.
    assert max(r["learning_rate"] for r in attempts[-1]) <= 0.01
    assert result.status == "completed", result.error
    assert attempts[-1][-1]["step"] == 3
