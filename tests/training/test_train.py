"""End-to-end training on a tiny model: each method, resume, DDP, legacy config names, run directory."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import read_jsonl, tiny_overrides
from safetensors.torch import load_file
from transformers import Trainer

from tunewise.config import load_config
from tunewise.model import load_model, load_tokenizer, resolve_hardware
from tunewise.training import run
from tunewise.training.run import TrainHooks, train

REPO = Path(__file__).parents[2]


def _complete(run_dir: Path, saved: str) -> None:
    """The run directory of docs/architecture.md is all there."""
    for name in ["config.yaml", "plan.json", "metrics.jsonl", "result.json", saved]:
        assert (run_dir / name).exists(), name
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*")), "no TensorBoard events"
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ  # a library leaves the process environment alone
    assert list(run_dir.glob("checkpoint-*/trainer_state.json"))
    records = read_jsonl(run_dir / "metrics.jsonl")
    train_steps = [r for r in records if r["type"] == "train"]
    for key in ["loss", "grad_norm", "learning_rate", "tokens", "time", "tokens_per_s"]:
        assert all(key in r for r in train_steps), key
    assert [r["step"] for r in train_steps] == list(range(1, len(train_steps) + 1))
    assert any(r["type"] == "eval" and "eval_loss" in r for r in records)


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_each_method_trains_and_writes_the_run_directory(method, tiny_model_dir, small_data, tmp_path):
    cfg = load_config(
        None,
        tiny_overrides(
            tiny_model_dir, small_data, tmp_path / "runs", {"model.method": method, "name": method}
        ),
    )
    result = train(cfg)
    assert result.status == "completed", result.error
    assert result.global_step == 6
    run_dir = tmp_path / "runs" / method
    saved = "model" if method == "full" else "adapter"
    _complete(run_dir, saved)
    assert json.loads((run_dir / "result.json").read_text())["status"] == "completed"
    if method == "full":
        before = load_file(tiny_model_dir / "model.safetensors")
        after = load_file(run_dir / "model" / "model.safetensors")
        changed = [
            k for k in before if k in after and not torch.equal(before[k], after[k].to(before[k].dtype))
        ]
        assert len(changed) >= len(before) // 2, "full fine-tuning left most weights untouched"
    else:
        adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
        lora_b = [v for k, v in adapter.items() if "lora_B" in k]
        assert lora_b and all(v.abs().sum() > 0 for v in lora_b), (
            "LoRA B matrices are still zero: no training"
        )


def test_gradient_checkpointing_with_adapter_gets_gradients(tiny_model_dir, small_data, tmp_path):
    """The silent failure: checkpointing + frozen embeddings gives the adapter no gradient unless fixed."""
    extra = {"training.gradient_checkpointing": True, "name": "ckpt", "training.max_steps": 2}
    cfg = load_config(None, tiny_overrides(tiny_model_dir, small_data, tmp_path / "runs", extra))
    result = train(cfg)
    steps = [r for r in read_jsonl(result.run_dir / "metrics.jsonl") if r["type"] == "train"]
    assert all(r["grad_norm"] > 0 for r in steps)
    # The guard itself: with checkpointing on, the adapter's inputs carry a gradient (tunewise's
    # `use_reentrant=False` would hide its absence from the grad norm above).
    model = load_model(cfg, resolve_hardware(cfg), load_tokenizer(cfg), False)
    assert model.get_input_embeddings()(torch.tensor([[1, 2, 3]])).requires_grad


def test_resume_restores_step_count_schedule_and_the_doctors_history(
    tiny_model_dir, small_data, tmp_path, monkeypatch
):
    overrides = tiny_overrides(tiny_model_dir, small_data, tmp_path / "runs", {"name": "whole"})
    whole = train(load_config(None, overrides))
    lrs_whole = {
        r["step"]: r["learning_rate"] for r in read_jsonl(whole.run_dir / "metrics.jsonl") if "loss" in r
    }

    def stop_after_checkpoint(record: dict) -> None:
        if record["step"] == 4:  # checkpoint-3 exists by now
            raise KeyboardInterrupt

    cfg = load_config(None, tiny_overrides(tiny_model_dir, small_data, tmp_path / "runs", {"name": "cut"}))
    stopped = train(cfg, hooks=TrainHooks(on_step=stop_after_checkpoint))
    assert stopped.status == "stopped"
    assert json.loads((stopped.run_dir / "result.json").read_text())["status"] == "stopped"
    before = {r["step"]: r["loss"] for r in read_jsonl(stopped.run_dir / "metrics.jsonl") if "loss" in r}
    replayed: list[list[tuple[int, float]]] = []
    restore = run.restore_history

    def spy(watcher, run_dir, checkpoint):  # the resumed attempt's doctor, right after its history
        found = restore(watcher, run_dir, checkpoint)
        replayed.append(list(watcher.losses))
        return found

    monkeypatch.setattr(run, "restore_history", spy)
    cfg = load_config(None, tiny_overrides(tiny_model_dir, small_data, tmp_path / "runs", {"name": "cut"}))
    resumed = train(cfg, resume=True)
    assert resumed.status == "completed" and resumed.global_step == whole.global_step == 6
    # the doctor of the resumed attempt starts with every step up to checkpoint-3, as logged before the stop
    assert replayed == [[(step, before[step]) for step in (1, 2, 3)]]
    records = [r for r in read_jsonl(resumed.run_dir / "metrics.jsonl") if r["type"] == "train"]
    # one line per step across the stop and the resume (a step that ran again replaces its line)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    after = {r["step"]: r["learning_rate"] for r in records if r["step"] >= 4}
    for step, lr in after.items():
        assert math.isclose(lr, lrs_whole[step], rel_tol=1e-6), (step, lr, lrs_whole[step])


def test_checkpoint_retention_keeps_best_and_newest(tiny_model_dir, small_data, tmp_path):
    # greater_is_better on a falling loss makes the FIRST checkpoint the best one: it must survive limit 1
    extra = {
        "name": "keep",
        "training.max_steps": 8,
        "training.eval_steps": 2,
        "training.save_steps": 2,
        "training.save_total_limit": 1,
        "training.greater_is_better": True,
        "training.learning_rate": 1e-2,
    }
    result = train(load_config(None, tiny_overrides(tiny_model_dir, small_data, tmp_path / "runs", extra)))
    kept = sorted(p.name for p in result.run_dir.glob("checkpoint-*"))
    best = result.numbers["best_checkpoint"]
    assert best in kept and "checkpoint-8" in kept, (best, kept)


def test_lesson_style_config_with_old_names_runs(tiny_model_dir, small_data, tmp_path):
    config = tmp_path / "lesson.yaml"
    config.write_text(
        "model:\n  method: lora\n"
        "training:\n  warmup_ratio: 0.1\n  evaluation_strategy: steps\n  num_train_epochs: 1\n"
        "  learning_rate: 2e-4\n  logging_dir: ./logs\n"
    )
    cfg = load_config(
        config, tiny_overrides(tiny_model_dir, small_data, tmp_path / "runs", {"name": "lesson"})
    )
    assert cfg.training["warmup_steps"] == 0.1 and cfg.training["eval_strategy"] == "steps"
    assert cfg.training["learning_rate"] == 2e-4  # YAML reads 2e-4 as text; it is still a number
    assert any("warmup_ratio" in n and "warmup_steps" in n for n in cfg.notices)
    assert any("evaluation_strategy" in n for n in cfg.notices)
    result = train(cfg)
    assert result.status == "completed"
    plan = json.loads((result.run_dir / "plan.json").read_text())
    assert plan["warmup_steps"] == 1  # ceil(0.1 x 6 steps)


def test_nan_is_logged_as_nan_not_zero(tiny_model_dir, small_data, tmp_path, monkeypatch):
    """A loss that turns NaN at step 3 (a fault put into the loss itself: every config that validation
    accepts is too tame to reach NaN on the tiny model before the doctor stops it) is logged as NaN."""
    compute_loss = Trainer.compute_loss

    def nan_from_step_3(self, *args, **kwargs):
        loss = compute_loss(self, *args, **kwargs)
        poisoned = float("nan") if self.state.global_step >= 2 else 1.0
        return (loss[0] * poisoned, *loss[1:]) if isinstance(loss, tuple) else loss * poisoned

    monkeypatch.setattr(Trainer, "compute_loss", nan_from_step_3)
    extra = {"name": "nan", "training.max_steps": 12, "training.logging_steps": 1}
    result = train(load_config(None, tiny_overrides(tiny_model_dir, small_data, tmp_path / "runs", extra)))
    steps = [r for r in read_jsonl(result.run_dir / "metrics.jsonl") if r["type"] == "train"]
    assert [math.isfinite(r["loss"]) for r in steps[:2]] == [True, True]
    assert math.isnan(steps[2]["loss"]) and steps[2]["step"] == 3  # NaN, never 0.0
    assert all(r["loss"] != 0.0 for r in steps)
    assert result.status == "diverged" and result.global_step == 3


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tiny_model_dir, small_data, tmp_path):
    overrides = tiny_overrides(tiny_model_dir, small_data, tmp_path / "runs", {"name": "ddp"})
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        # overrides before the flags: the relaunch once appended them after `--quiet` and every rank failed
        [
            sys.executable,
            "-m",
            "tunewise.cli",
            "train",
            *overrides,
            "--nproc",
            "2",
            "--force",
            "--quiet",
            "--no-samples",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "ddp"
    plan = json.loads((run_dir / "plan.json").read_text())
    result = json.loads((run_dir / "result.json").read_text())
    assert plan["steps"]["processes"] == 2 and plan["steps"]["effective_batch"] == 4 * 2 * 2
    assert result["status"] == "completed" and result["global_step"] == 6
    _complete(run_dir, "adapter")
    assert "step 1/" not in proc.stdout and not (run_dir / "samples.json").exists()  # --quiet, --no-samples
