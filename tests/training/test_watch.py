"""`tunewise.watch(trainer)` on real trainers: TRL's SFTTrainer, a plain Trainer, subclasses, DDP, SmolLM2.

Every run trains a tiny Llama built from a config (hidden 64, the SmolLM2 tokenizer) for real: a rate that
diverges, the same in recover mode, labels that are all masked, a healthy run. Each test checks what the
monitor wrote (metrics.jsonl, findings.jsonl, result.json), what it printed, and what `tunewise doctor`
says about the run directory afterwards.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_overrides
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from trl import SFTConfig, SFTTrainer

import tunewise
from tunewise import rundir
from tunewise.cli import main
from tunewise.config import load_config
from tunewise.data import DataCollator
from tunewise.doctor.diagnose import diagnose_path
from tunewise.doctor.findings import read_findings
from tunewise.report import write_report
from tunewise.training.run import train
from tunewise.training.watch import WatchError

TOKENIZER = Path(__file__).resolve().parents[1] / "fixtures" / "tokenizers" / "smollm2"
ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # TRL's telemetry and the hub stay quiet
# Shared by every run: CPU, no logging integrations, the loss logged at every step for the comparisons.
COMMON = {
    "report_to": [],
    "use_cpu": True,
    "disable_tqdm": True,
    "dataloader_pin_memory": False,
    "logging_steps": 1,
    "save_strategy": "no",
    "seed": 0,
}
# AdamW at an absurd constant rate: its first update moves every weight by ~1e8; step 2's gradient is NaN.
ABSURD_ADAM = {
    "optim": "adamw_torch",
    "learning_rate": 1e8,
    "max_grad_norm": 0.0,
    "lr_scheduler_type": "constant",
}
# Plain SGD at lr 3 without clipping (fp32): the loss explodes from step 4 (NaN by step 9); lr 0.3 trains.
CLIMBING_SGD = {"optim": "sgd", "learning_rate": 3.0, "max_grad_norm": 0.0, "lr_scheduler_type": "constant"}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER)


def tiny_model(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama (hidden 64) with the SmolLM2 vocabulary, random weights from `seed`."""
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def sums(n: int = 64) -> Dataset:
    """TRL's conversational prompt-completion format: "What is i plus i?" -> "2i"."""
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
                "completion": [{"role": "assistant", "content": str(2 * i)}],
            }
            for i in range(n)
        ]
    )


def tokenized(tokenizer, n: int = 64, masked: bool = False) -> Dataset:
    """input_ids + labels for a plain Trainer; `masked`: every label -100 (nothing to learn)."""
    rows = []
    for i in range(n):
        ids = tokenizer(f"{i} plus {i} is {2 * i}.").input_ids + [tokenizer.eos_token_id]
        rows.append({"input_ids": ids, "labels": [-100] * len(ids) if masked else list(ids)})
    return Dataset.from_list(rows)


def sft_trainer(tokenizer, out: Path, model=None, **args) -> SFTTrainer:
    config = SFTConfig(
        output_dir=str(out), max_length=64, per_device_train_batch_size=4, **{**COMMON, **args}
    )
    return SFTTrainer(
        model=model or tiny_model(tokenizer), args=config, train_dataset=sums(), processing_class=tokenizer
    )


def plain_trainer(kind: type[Trainer], tokenizer, out: Path, dataset: Dataset, **args) -> Trainer:
    config = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, remove_unused_columns=False, **{**COMMON, **args}
    )
    return kind(
        model=tiny_model(tokenizer),
        args=config,
        train_dataset=dataset,
        data_collator=DataCollator(pad_token_id=tokenizer.pad_token_id),
    )


def train_steps(run_dir: Path) -> list[dict]:
    return rundir.train_records(rundir.read_metrics(run_dir))


def finite_step(record: dict) -> bool:
    return math.isfinite(record["loss"]) and (
        record["grad_norm"] is None or math.isfinite(record["grad_norm"])
    )


def weights_finite(model) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


def logged_losses(trainer: Trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


# ----------------------------------------------------------------------------- attaching


def test_an_object_that_is_not_a_trainer_is_one_clear_error():
    with pytest.raises(WatchError, match=r"needs a transformers\.Trainer .* got builtins\.dict.*tunewise"):
        tunewise.watch({"model": "not a trainer"})
    assert issubclass(WatchError, TypeError)


def test_import_tunewise_stays_light_and_watch_is_its_public_door():
    code = "import sys, tunewise; assert not {'torch', 'transformers'} & set(sys.modules); tunewise.watch"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert done.returncode == 0, done.stderr
    assert tunewise.watch is tunewise.training.watch.watch


def test_recover_without_checkpoints_is_refused_with_the_fix(tokenizer, tmp_path):
    trainer = sft_trainer(tokenizer, tmp_path, max_steps=2)
    with pytest.raises(ValueError, match="save_strategy='steps'"):
        tunewise.watch(trainer, on_divergence="recover")


# ----------------------------------------------------------------------------- TRL SFTTrainer


def test_sft_trainer_absurd_rate_diverges_at_its_step_and_the_update_is_never_applied(tokenizer, tmp_path):
    # AdamW at lr 1e8 under bf16: step 1 is finite, step 2's gradient is NaN. A checkpoint after each step.
    trainer = sft_trainer(
        tokenizer, tmp_path, max_steps=6, bf16=True, **ABSURD_ADAM, save_strategy="steps", save_steps=1
    )
    out = io.StringIO()
    watched = tunewise.watch(trainer, stream=out)
    trainer.train()
    run_dir = tmp_path / "tunewise"
    assert watched.run_dir == run_dir and watched.status == "diverged"
    steps = train_steps(run_dir)
    bad, stop = next(r["step"] for r in steps if not finite_step(r)), watched.diverged_at
    assert bad == 2 and [r["step"] for r in steps] == list(range(1, stop + 1)), "every step seen"
    assert trainer.state.global_step == stop and all(not finite_step(r) for r in steps[bad - 1 :])
    assert math.isnan(steps[bad - 1]["grad_norm"]), "NaN is kept as NaN"
    assert watched.monitor.skipped_steps == list(range(bad, stop + 1)), "every non-finite update skipped"
    assert weights_finite(trainer.model), "a non-finite update was applied"
    # The skipped steps changed nothing: weights and AdamW's moments and step counts are step 1's.
    before, after = tmp_path / f"checkpoint-{bad - 1}", tmp_path / f"checkpoint-{stop}"
    weights_before, weights_after = (
        load_file(before / "model.safetensors"),
        load_file(after / "model.safetensors"),
    )
    assert all(torch.equal(weights_before[k], weights_after[k]) for k in weights_before)
    state_before = torch.load(before / "optimizer.pt", weights_only=True)["state"]
    state_after = torch.load(after / "optimizer.pt", weights_only=True)["state"]
    assert state_before and state_before.keys() == state_after.keys()
    for key, moments in state_before.items():
        for name, value in moments.items():  # exp_avg, exp_avg_sq, step
            assert torch.equal(value, state_after[key][name]), (key, name)
    # Found at the step it happened and printed once each, with fixes in TrainingArguments' words.
    findings = read_findings(run_dir / rundir.FINDINGS)
    assert [f for f in findings if f.step == bad], "nothing said at the first non-finite step"
    error = watched.monitor.divergence
    assert error.code == "non_finite" and error.fixes[0].change == "learning_rate=1.0e+07"
    assert not [fix for f in findings for fix in f.fixes if (fix.change or "").startswith("training.")]
    text = out.getvalue()
    assert text.count(f"at step {bad}:") == 1 and "fix 1: learning_rate=1.0e+07" in text
    assert all(text.count(f"{f.severity.upper()} at step {f.step}: {f.title}\n") == 1 for f in findings)
    result = json.loads((run_dir / rundir.RESULT).read_text())
    assert result["status"] == "diverged" and result["diverged_at"] == stop
    assert f"non-finite updates of steps {bad}-{stop} were not applied" in result["error"]
    assert result["error"].endswith("try learning_rate=1.0e+07") and result["error"] in text
    # `tunewise doctor` reads the run directory as it is.
    assert diagnose_path(run_dir).verdict == "diverged"


def test_healthy_sft_run_raises_no_warning(tokenizer, tmp_path):
    trainer = sft_trainer(tokenizer, tmp_path, max_steps=16, learning_rate=2e-3, warmup_steps=2)
    out = io.StringIO()
    watched = tunewise.watch(trainer, stream=out)
    trainer.train()
    assert watched.status == "completed" and out.getvalue() == ""
    steps = train_steps(watched.run_dir)
    assert [r["step"] for r in steps] == list(range(1, 17))
    assert steps[-1]["loss"] < 0.9 * steps[0]["loss"]
    assert all(r["trained_tokens"] > 0 and r["tokens"] > r["trained_tokens"] for r in steps), "prompt masked"
    assert [f for f in read_findings(watched.run_dir / rundir.FINDINGS) if f.severity != "info"] == []
    assert diagnose_path(watched.run_dir).verdict == "healthy"
    html = write_report(watched.run_dir).read_text()  # `tunewise report` reads it as a tunewise run
    assert "HEALTHY" in html and "learning_rate" in html
    # Every step's loss is the one the Trainer itself logged.
    logged = logged_losses(trainer)
    assert all(math.isclose(r["loss"], logged[r["step"]], rel_tol=1e-4) for r in steps)


def test_recover_mode_resumes_from_before_the_climb_with_a_tenth_of_the_rate(tokenizer, tmp_path):
    trainer = sft_trainer(
        tokenizer, tmp_path, max_steps=8, bf16=False, **CLIMBING_SGD, save_strategy="steps", save_steps=1
    )
    out = io.StringIO()
    watched = tunewise.watch(trainer, on_divergence="recover", stream=out)
    trainer.train()
    assert watched.status == "completed", watched.error
    assert watched.recovery_changes == ["learning_rate=0.3"]
    assert trainer.state.global_step == 8 and weights_finite(trainer.model)
    steps = train_steps(watched.run_dir)
    restart = next(i for i in range(1, len(steps)) if steps[i]["step"] <= steps[i - 1]["step"])
    before, after = steps[:restart], steps[restart:]
    recovery = next(f for f in watched.findings if f.code == "recovery")
    assert before[-1]["step"] == recovery.evidence["diverged_at"] and all(finite_step(r) for r in after)
    # It went back to a checkpoint from before the loss began to climb, not the one just before the NaN.
    climb = next(r["step"] for r in before if r["loss"] > 2 * before[0]["loss"])
    assert after[0]["step"] <= climb and all(r["learning_rate"] == pytest.approx(0.3) for r in after)
    assert (
        f"recovering: restarting from checkpoint-{after[0]['step'] - 1} with learning_rate=0.3"
        in out.getvalue()
    )
    result = json.loads((watched.run_dir / rundir.RESULT).read_text())
    assert result["status"] == "completed" and result["recovery_changes"] == ["learning_rate=0.3"]
    # The doctor, after the fact, reads the resumed curve (the abandoned steps are dropped).
    assert diagnose_path(watched.run_dir).verdict != "diverged"


# ----------------------------------------------------------------------------- plain Trainer and subclasses


class LossCountingTrainer(Trainer):
    """A user's subclass that overrides compute_loss (its own cross-entropy)."""

    calls = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.calls += 1
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits, targets = outputs.logits[:, :-1].float(), labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100
        )
        return (loss, outputs) if return_outputs else loss


class StepCountingTrainer(Trainer):
    """A user's subclass that overrides training_step."""

    steps = 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.steps += 1
        return super().training_step(model, inputs, num_items_in_batch)


@pytest.mark.parametrize("kind", [LossCountingTrainer, StepCountingTrainer])
def test_a_trainer_subclass_is_watched_at_every_micro_batch(kind, tokenizer, tmp_path):
    trainer = plain_trainer(
        kind,
        tokenizer,
        tmp_path,
        tokenized(tokenizer),
        max_steps=5,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        logging_steps=1000,
    )
    watched = tunewise.watch(trainer, stream=io.StringIO())
    assert tunewise.watch(trainer) is watched, "watching twice attaches once"
    trainer.train()
    assert (
        trainer.calls if kind is LossCountingTrainer else trainer.steps
    ) == 10  # 5 steps x 2 micro-batches
    steps = train_steps(watched.run_dir)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5], "every optimizer step, not only logging steps"
    assert all(finite_step(r) and r["grad_norm"] > 0 and r["learning_rate"] > 0 for r in steps)
    # Two micro-batches of 4 rows each: tokens are the attention mask's, every label is trained here.
    assert all(r["tokens"] == r["trained_tokens"] + 8 for r in steps)  # (labels shift: 1 per row)
    assert trainer.state.log_history[-1]["train_loss"] == pytest.approx(
        sum(r["loss"] for r in steps) / 5, rel=1e-4
    )


def test_all_labels_masked_is_nothing_to_learn_and_stops_early(tokenizer, tmp_path):
    trainer = plain_trainer(
        Trainer, tokenizer, tmp_path, tokenized(tokenizer, masked=True), max_steps=40, learning_rate=1e-3
    )
    out = io.StringIO()
    watched = tunewise.watch(trainer, stream=out)
    trainer.train()
    assert watched.status == "stopped" and trainer.state.global_step == 10
    assert "nothing to learn" in watched.error and "nothing to learn" in out.getvalue()
    findings = read_findings(watched.run_dir / rundir.FINDINGS)
    assert not [f for f in findings if f.code == "non_finite"], "0/0 from masked labels called a divergence"
    assert [f.code for f in findings if f.severity == "error"] == ["no_trainable_tokens"]
    assert weights_finite(trainer.model)
    assert diagnose_path(watched.run_dir).verdict == "flat"


# ------------------------------------------------------------------ the doctor afterwards: the script's words


def doctor_fixes(run_dir: Path, capsys) -> tuple[str, list[str]]:
    """`tunewise doctor RUN_DIR`'s text and the changes it lists under "fixes (try in this order...)"."""
    capsys.readouterr()
    main(["doctor", str(run_dir)])
    text = capsys.readouterr().out
    block = text.split("fixes (try in this order", 1)[1].split("checkpoint to keep", 1)[0]
    changes = [
        line.split(". ", 1)[1] for line in block.splitlines() if line[:4].strip().rstrip(".").isdigit()
    ]
    return text, changes


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_doctor_gives_a_watched_run_its_fixes_as_training_arguments_for_its_precision(
    precision, tokenizer, tmp_path, capsys
):
    # AdamW at lr 1e8: step 2's gradient is NaN while its loss is still step 1's (an overflow), then the stop.
    half = {"bf16": precision == "bf16", "fp16": precision == "fp16"}
    trainer = plain_trainer(
        Trainer, tokenizer, tmp_path, tokenized(tokenizer), max_steps=6, **half, **ABSURD_ADAM
    )
    out = io.StringIO()
    watched = tunewise.watch(trainer, stream=out)
    trainer.train()
    assert watched.status == "diverged"
    config = yaml.safe_load((watched.run_dir / rundir.CONFIG).read_text())
    assert config["source"] == "tunewise.watch" and config["model"]["precision"] == precision
    findings = read_findings(watched.run_dir / rundir.FINDINGS)
    overflow = next(f for f in findings if f.code == "grad_norm_non_finite")
    live = [fix.change for fix in overflow.fixes]
    text, changes = doctor_fixes(watched.run_dir, capsys)
    assert "as arguments of your training script" in text
    assert changes[0] == "learning_rate=1.0e+07" and "max_grad_norm=0.3" in changes, changes
    assert not [c for c in changes if c.startswith(("training.", "model.", "adapter.", "data."))], changes
    if precision == "fp16":  # the loss scaler's overflow: bf16 is the cure, live and afterwards
        assert live[0] == "bf16=True" and "bf16=True" in changes, (live, changes)
        return
    for said in (live, changes, out.getvalue()):
        assert "bf16=True" not in said, "bf16 suggested to a run that is bf16 already, or fp32"
    assert live[0] == "learning_rate=1.0e+07", live  # a real blow-up: no loss scaler skipped it
    # Under bf16, fp32 for the unstable part; under fp32 no precision change would help.
    bf16 = precision == "bf16"
    assert ("bf16=False fp16=False" in live) is bf16 and ("bf16=False fp16=False" in changes) is bf16


def test_a_plain_trainer_output_dir_gets_training_arguments_too(tokenizer, tmp_path, capsys):
    """No tunewise in the loop: the Trainer's own trainer_state.json, read by `tunewise doctor`."""
    trainer = plain_trainer(
        Trainer,
        tokenizer,
        tmp_path,
        tokenized(tokenizer),
        max_steps=12,
        **CLIMBING_SGD,
        save_strategy="steps",
    )
    trainer.args.save_steps = 12
    trainer.train()
    assert (tmp_path / "checkpoint-12" / "trainer_state.json").is_file() and not (
        tmp_path / "tunewise"
    ).exists()
    text, changes = doctor_fixes(tmp_path, capsys)
    assert "verdict: DIVERGED" in text and changes[0] == "learning_rate=3.0e-01", changes
    assert not [c for c in changes if c.startswith("training.")], changes


def test_a_tunewise_train_run_keeps_tunewise_overrides(tiny_model_dir, small_data, tmp_path, capsys):
    """The contrast: a run `tunewise train` wrote is fixed in its user's words, tunewise overrides."""
    extra = {  # Adam at a constant 0.9, full fine-tuning: the loss explodes by step 3 (test_divergence_stop)
        "model.method": "full",
        "training.optim": "adamw_torch",
        "training.learning_rate": 0.9,
        "training.max_grad_norm": 0,
        "training.warmup_steps": 0,
        "training.lr_scheduler_type": "constant",
        "training.logging_steps": 1,
        "training.max_steps": 12,
        "training.eval_steps": 1000,
        "training.save_steps": 1000,
        "training.load_best_model_at_end": False,
    }
    result = train(load_config(None, tiny_overrides(tiny_model_dir, small_data, tmp_path, extra)))
    assert result.status == "diverged"
    text, changes = doctor_fixes(result.run_dir, capsys)
    assert "tunewise config overrides" in text
    assert changes[0] == "training.learning_rate=9.0e-02" and "training.max_grad_norm=0.3" in changes, changes


# ----------------------------------------------------------------------------- DDP and the real model


@pytest.mark.slow
def test_two_process_ddp_writes_one_run_directory(tmp_path):
    script = ROOT / "tests" / "training" / "watch_ddp_script.py"
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29531",
            str(script),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run_dirs = [p.parent for p in tmp_path.rglob(rundir.METRICS)]
    assert run_dirs == [tmp_path / "out" / "tunewise"]
    steps = train_steps(run_dirs[0])
    assert [r["step"] for r in steps] == [1, 2, 3, 4], "one line per step: only the main process writes"
    assert json.loads((run_dirs[0] / rundir.RESULT).read_text())["status"] == "completed"
    plan = json.loads((run_dirs[0] / rundir.PLAN).read_text())
    assert plan["hardware"]["processes"] == 2 and plan["steps"]["effective_batch"] == 8


@pytest.mark.slow
def test_real_smollm2_with_sft_trainer_and_watch(tmp_path):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from tunewise.model import resolve_model_path

    path = resolve_model_path("smollm2-135m-instruct")  # the embedded model, converted once into the cache
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(tmp_path),
            max_steps=3,
            per_device_train_batch_size=2,
            learning_rate=2e-4,
            max_length=128,
            **COMMON,
        ),
        train_dataset=sums(16),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    watched = tunewise.watch(trainer, stream=io.StringIO())
    trainer.train()
    assert watched.status == "completed"
    steps = train_steps(watched.run_dir)
    assert [r["step"] for r in steps] == [1, 2, 3] and all(finite_step(r) for r in steps)
    plan = json.loads((watched.run_dir / rundir.PLAN).read_text())
    assert plan["method"] == "lora" and plan["steps"]["total_steps"] == 3
    assert diagnose_path(watched.run_dir).verdict == "insufficient-data"
