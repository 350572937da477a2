"""A run survives a kill and resumes exactly (#13), in real processes on a tiny model on the CPU.

An uninterrupted run is the reference. Each other run is SIGKILLed (after a random step, or in the
middle of a checkpoint save) or sent SIGINT/SIGTERM, then `tunewise train --resume` finishes it.
The final adapter must equal the reference's bit for bit, and the examples each optimizer step saw
(every prompt says "example <i>"; resume_helper.py records them) must be the reference's order.
A negative control that restores neither the RNG states nor the data position must differ: it
proves the comparison can fail.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import read_jsonl
from safetensors.torch import load_file

from tunewise.rundir import STAGING, checkpoint_problem

HELPER = Path(__file__).parent / "resume_helper.py"
MAX_STEPS = 12  # 48 examples, 8 per step: two epochs, so a resume also crosses an epoch boundary
SAVE_EVERY = 2
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
KILLS: list[str] = []  # what each test killed and whether the run came back exact, for the README figure


def _data(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n, offset in [("train", 48, 0), ("validation", 8, 1000)]:
        rows = [
            {
                "messages": [
                    {"role": "user", "content": f"example {i}: what is {i} plus one?"},
                    {"role": "assistant", "content": f"{i + 1}"},
                ]
            }
            for i in range(offset, offset + n)
        ]
        paths[split] = root / f"{split}.jsonl"
        paths[split].write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return paths


def _args(model_dir: Path, data: dict[str, Path], out: Path, name: str) -> list[str]:
    settings = {
        "name": name,
        "output_dir": out,
        "model.name": model_dir,
        "model.method": "lora",
        "model.precision": "fp32",
        "data.train": data["train"],
        "data.validation": data["validation"],
        "data.max_seq_length": 64,
        "training.per_device_train_batch_size": 4,
        "training.gradient_accumulation_steps": 2,
        "training.max_steps": MAX_STEPS,
        "training.logging_steps": 1,
        "training.eval_steps": SAVE_EVERY,
        "training.save_steps": SAVE_EVERY,
        "training.save_total_limit": 3,
        "training.optim": "adamw_torch",
        "training.gradient_checkpointing": False,
        "training.learning_rate": 1e-3,
        "training.dataloader_num_workers": 0,
        "adapter.dropout": 0.1,  # dropout draws from the RNG: a resume that loses it diverges
    }
    return ["--force", "--quiet", "--no-samples", *(f"{k}={v}" for k, v in settings.items())]


def _run(
    record: Path, train_args: list[str], *helper_args: str, resume: bool = False
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(HELPER),
        str(record),
        *helper_args,
        "--",
        *train_args,
        *(["--resume"] if resume else []),
    ]
    return subprocess.run(cmd, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=600)


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def _order(record: Path) -> dict[int, list[list[int]]]:
    """Step -> the example ids of its micro-batches, as the last process to run that step saw them."""
    by_pid: dict[int, dict[int, list[list[int]]]] = {}
    for r in read_jsonl(record):
        by_pid.setdefault(r["pid"], {}).setdefault(r["step"], []).append(r["ids"])
    order: dict[int, list[list[int]]] = {}
    for steps in by_pid.values():  # processes in the order they ran: a later one redoes lost steps
        order.update(steps)
    return order


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict:
    root = tmp_path_factory.mktemp("resume")
    data = _data(root / "data")
    reference = root / "reference.jsonl"
    done = _run(reference, _args(tiny_model_dir, data, root / "runs", "reference"))
    assert done.returncode == 0, done.stderr[-3000:]
    yield {
        "root": root,
        "data": data,
        "model": tiny_model_dir,
        "reference": root / "runs" / "reference",
        "order": _order(reference),
    }
    print(f"\nkills survived/tried: {KILLS.count('exact')}/{len(KILLS)} {KILLS}")


def _assert_same_run(setup: dict, run_dir: Path, record: Path) -> None:
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed" and result["global_step"] == MAX_STEPS, result
    reference, resumed = _adapter(setup["reference"]), _adapter(run_dir)
    assert reference.keys() == resumed.keys()
    different = [k for k in reference if not torch.equal(reference[k], resumed[k])]
    assert not different, (
        f"{len(different)} adapter tensors differ from the uninterrupted run: {different[:3]}"
    )
    assert _order(record) == setup["order"], "the examples each step saw differ from the uninterrupted run"
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("type") == "train"]
    assert steps == list(range(1, MAX_STEPS + 1)), steps  # one line per step, none twice


@pytest.mark.model
@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_after_a_random_step_then_resume_is_exact(setup, seed):
    step = random.Random(seed).randint(3, MAX_STEPS - 1)
    name, record = f"kill-step-{seed}", setup["root"] / f"kill-step-{seed}.jsonl"
    args = _args(setup["model"], setup["data"], setup["root"] / "runs", name)
    killed = _run(record, args, "--kill-at-step", str(step))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    KILLS.append("killed")
    resumed = _run(record, args, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(setup, setup["root"] / "runs" / name, record)
    KILLS[-1] = "exact"


@pytest.mark.model
def test_sigkill_during_a_checkpoint_save_then_resume_skips_it_and_is_exact(setup):
    step = 6  # a save step: the model and optimizer are written, the RNG state and manifest are not
    name, record = "kill-in-save", setup["root"] / "kill-in-save.jsonl"
    run_dir = setup["root"] / "runs" / name
    args = _args(setup["model"], setup["data"], setup["root"] / "runs", name)
    killed = _run(record, args, "--kill-in-save-at", str(step))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    KILLS.append("killed")
    assert not (run_dir / f"checkpoint-{step}").exists()  # the torn save never got the real name
    assert (run_dir / STAGING / f"checkpoint-{step}" / "optimizer.pt").is_file()
    assert checkpoint_problem(run_dir / "checkpoint-4") is None
    resumed = _run(record, args, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        f"{STAGING}/checkpoint-{step} ignored: a save that was interrupted" in resumed.stdout + resumed.stderr
    )
    _assert_same_run(setup, run_dir, record)
    KILLS[-1] = "exact"


@pytest.mark.model
def test_negative_control_a_resume_that_restores_nothing_is_caught(setup):
    name, record = "no-restore", setup["root"] / "no-restore.jsonl"
    args = _args(setup["model"], setup["data"], setup["root"] / "runs", name)
    killed = _run(record, args, "--kill-at-step", "5")
    assert killed.returncode == -signal.SIGKILL
    resumed = _run(record, [*args, "training.ignore_data_skip=true"], "--no-restore", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with pytest.raises(AssertionError, match="differ from the uninterrupted run"):
        _assert_same_run(setup, setup["root"] / "runs" / name, record)


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and any(
            r.get("step", 0) >= step for r in read_jsonl(metrics) if r.get("type") == "train"
        ):
            return
        time.sleep(0.2)
    raise AssertionError(f"the run did not reach step {step}")


@pytest.mark.model
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigint_and_sigterm_save_a_checkpoint_stop_cleanly_and_resume_exactly(setup, sig):
    name, record = f"signal-{sig.name}", setup["root"] / f"signal-{sig.name}.jsonl"
    run_dir = setup["root"] / "runs" / name
    args = _args(setup["model"], setup["data"], setup["root"] / "runs", name)
    cmd = [sys.executable, str(HELPER), str(record), "--", *args]
    proc = subprocess.Popen(
        cmd, env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_step(run_dir, 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]  # a run that did not complete: status 1, no traceback
    assert "Traceback" not in err, err[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    stopped_at = result["global_step"]
    assert result["status"] == "stopped" and 3 <= stopped_at < MAX_STEPS, result
    assert f"stopped by {sig.name} at step {stopped_at}" in result["error"]
    assert f"resume with: tunewise train {run_dir / 'config.yaml'} --resume" in result["error"]
    assert checkpoint_problem(run_dir / f"checkpoint-{stopped_at}") is None  # the step it stopped at is saved
    KILLS.append("stopped")
    resumed = _run(record, args, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(setup, run_dir, record)
    KILLS[-1] = "exact"
