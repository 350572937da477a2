"""What `tunewise.watch(trainer)` costs on a TRL SFTTrainer run, as a share of the step time, in the same run.

The same-run paired design of bench_monitor.py (whose helpers it reuses): one SFTTrainer, watched; in each
block of two optimizer steps one step, chosen at random, runs everything watch attached (the wrapped
`training_step` and `_get_grad_norm`, the StepMonitor's callbacks, metrics.jsonl, the doctor) and the other
runs the SFTTrainer's own methods with the monitor switched off. Each block gives one paired difference;
their mean over the plain step time is the overhead, with a 95% confidence interval. Slow drift of the
machine cancels within a block. The time inside the monitor's callbacks and StepRecord is also timed
directly (`direct`).

Models (`--model`):
  - `tiny` (default): a 4-layer Llama (hidden 256, SmolLM2 tokenizer), fully fine-tuned: a short step,
    where a fixed per-step cost weighs the most;
  - `smollm2`: the embedded SmolLM2-135M-Instruct with LoRA r 8 on all linear layers.
Data: the bundled contacts dataset in TRL's `messages` format, batch 4.

    PYTHONPATH=src python benchmarks/bench_watch.py [--model tiny|smollm2] [--steps 60] [--rounds 1]

Writes benchmarks/results/watch.json (one entry per model).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_monitor import SKIP, Clock, _switch, interleaved_summary, make_model_dir, step_timer  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "watch.json"
MODELS = {
    "tiny": {
        "learning_rate": 1e-4,
        "describe": "4-layer Llama (hidden 256, SmolLM2 tokenizer), full fine-tuning",
    },
    "smollm2": {"learning_rate": 4e-4, "describe": "SmolLM2-135M-Instruct (embedded), LoRA r 8 all-linear"},
}


def build_trainer(model_dir: str, lora: bool, out: Path, steps: int, learning_rate: float):
    """An SFTTrainer as a user's script builds it: model, SFTConfig, the bundled data in `messages` form."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tunewise.task import bundled_data_dir

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    dataset = load_dataset("json", data_files=str(bundled_data_dir() / "train.jsonl"), split="train")
    args = SFTConfig(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=learning_rate,
        max_grad_norm=0.3,
        max_length=256,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        seed=0,
        dataloader_pin_memory=False,
    )
    peft = (
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM") if lora else None
    )
    return SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft
    )


def one_run(model_dir: str, lora: bool, out: Path, steps: int, learning_rate: float, seed: int) -> dict:
    """Train `steps` steps: watched on one of each two steps (picked at random), plain on the other."""
    import tunewise

    trainer = build_trainer(model_dir, lora, out, steps, learning_rate)
    plain_step, plain_norm = trainer.training_step, trainer._get_grad_norm  # the SFTTrainer's own
    watched = tunewise.watch(trainer, stream=io.StringIO())
    rng = random.Random(seed)
    on = {2 * block + 1 + rng.randrange(2) for block in range(steps // 2)}
    in_step = lambda: trainer.state.global_step + 1 in on  # noqa: E731 (before the step's end)
    after_step = lambda: trainer.state.global_step in on  # noqa: E731 (at the step's end)
    clock = Clock()
    record, monitor = trainer.step_record, watched.monitor
    record.add = clock.wrap(record.add)
    record.settle = clock.wrap(record.settle)
    trainer.training_step = _switch(in_step, trainer.training_step, plain_step)
    trainer._get_grad_norm = _switch(in_step, trainer._get_grad_norm, plain_norm)
    for name, active in (("on_pre_optimizer_step", in_step), ("on_step_end", after_step)):
        setattr(monitor, name, _switch(active, clock.wrap(getattr(monitor, name))))
    monitor.on_train_end = clock.wrap(monitor.on_train_end)
    trainer.add_callback(step_timer(clock))
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    recorded = sorted(r["step"] for r in _train_lines(watched.run_dir / "metrics.jsonl"))
    assert recorded == sorted(on), (recorded, sorted(on))  # watch saw exactly the steps it was on for
    ends = clock.step_ends
    measured = range(SKIP + 2, len(ends) + 1)  # step s took ends[s-1] - ends[s-2]
    return {
        "step_times": {s: ends[s - 1][0] - ends[s - 2][0] for s in measured},
        "cpu_times": {s: ends[s - 1][1] - ends[s - 2][1] for s in measured},
        "watched": sorted(on),
        "monitor_s": clock.inside,
        "total_s": total,
        "steps": len(ends),
        "status": watched.status,
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }


def _train_lines(path: Path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("type") == "train"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=1, help="runs (each with its own random pairing)")
    opts = parser.parse_args()

    import torch

    from tunewise.model import resolve_model_path

    spec = MODELS[opts.model]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = (
            str(make_model_dir(tmp / "model"))
            if opts.model == "tiny"
            else resolve_model_path("smollm2-135m-instruct")
        )
        for i in range(opts.rounds):
            run = one_run(
                model_dir,
                opts.model == "smollm2",
                tmp / f"run-{i}",
                opts.steps,
                spec["learning_rate"],
                seed=i,
            )
            runs.append(("interleaved", run))
            median = statistics.median(run["step_times"].values())
            print(f"run {i + 1}/{opts.rounds}: median step {median:.4f} s", file=sys.stderr)
    watched_steps = sum(len(r["watched"]) for _, r in runs)
    per_step = sum(r["monitor_s"] for _, r in runs) / max(watched_steps, 1)
    typical = statistics.median(t for _, r in runs for t in r["step_times"].values())
    entry = {
        "trainer": "trl.SFTTrainer + tunewise.watch(trainer)",
        "model": {
            "describe": spec["describe"],
            "parameters": runs[0][1]["parameters"],
            "trainable": runs[0][1]["trainable"],
        },
        "batch": "4 examples per step, bundled contacts data in TRL's messages format (~80 tokens each)",
        "steps_per_run": opts.steps,
        "runs": opts.rounds,
        "skipped_first_steps": SKIP,
        **interleaved_summary(runs),
        "monitor_time_per_step_s": round(per_step, 6),
        "overhead_pct_direct": round(100 * per_step / typical, 3),
        "goal_pct": 2.0,
        "torch_threads": torch.get_num_threads(),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "processor": platform.machine(),
            "load_average": os.getloadavg(),
        },
    }
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results[opts.model] = entry
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(entry, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
