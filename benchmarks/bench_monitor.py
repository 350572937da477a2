"""What the live monitor costs: the same training with and without it, as a share of the step time.

Without: a plain `transformers.Trainer`. With: tunewise's `WatchedTrainer` (records each micro-batch's loss
and tokens and the pre-clip gradient norm) plus its `StepMonitor` (guards the update, writes metrics.jsonl,
feeds the doctor's CurveWatcher every step). Same model weights, data, batches and TrainingArguments.
The model is a 4-layer Llama (hidden 256) with the real SmolLM2 tokenizer, fully fine-tuned on the
bundled dataset, so a step takes a realistic fraction of a second on a CPU.

Two measures:
  - A/B: median step time with the monitor vs without, runs interleaved (plain, monitored, plain, ...)
    so that load from other processes hits both alike; in wall time and in this process's CPU time (one
    torch thread: CPU time is what the step costs, and other processes' load disturbs it less).
  - direct: the time spent inside the monitor's callbacks and WatchedTrainer's extra work, timed around
    each call, divided by the step time. Precise; it leaves out nothing that the monitor adds.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_monitor.py [--steps 30] [--rounds 3]

Writes benchmarks/results/monitor.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "fixtures" / "tokenizers" / "smollm2"
RESULTS = ROOT / "benchmarks" / "results" / "monitor.json"
SKIP = 3  # first steps of each run: allocator and thread-pool warm-up


def make_model_dir(directory: Path) -> Path:
    """A 4-layer Llama (hidden 256) saved with the SmolLM2 tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


class Clock:
    """Seconds spent inside wrapped calls, and step boundaries."""

    def __init__(self) -> None:
        self.inside = 0.0
        self.step_ends: list[tuple[float, float]] = []  # (wall, process CPU) at each step's end

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.inside += time.perf_counter() - start
        return timed


def step_timer(clock: Clock):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.step_ends.append((time.perf_counter(), time.process_time()))

    return StepTimer()


def one_run(model_dir: Path, bundle, tokenizer, out: Path, steps: int, monitored: bool) -> dict:
    """Train `steps` steps; per-step times, and the monitor's own time when it is attached."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from tunewise.data import DataCollator
    from tunewise.diagnose import CurveWatcher
    from tunewise.monitor import StepMonitor, WatchedTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4,
                             gradient_accumulation_steps=1, learning_rate=1e-4, optim="adamw_torch",
                             max_grad_norm=0.3, logging_steps=10, save_strategy="no", eval_strategy="no",
                             report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                             remove_unused_columns=False, dataloader_pin_memory=False)
    kind = WatchedTrainer if monitored else Trainer
    collator = DataCollator(pad_token_id=tokenizer.pad_token_id)
    trainer = kind(model=model, args=args, train_dataset=bundle.to_hf("train"), data_collator=collator,
                   processing_class=tokenizer)
    clock = Clock()
    if monitored:
        run_dir = out / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        monitor = StepMonitor(trainer, run_dir, CurveWatcher(method="full", learning_rate=1e-4,
                                                             max_grad_norm=0.3, total_steps=steps))
        for name in ("on_train_begin", "on_pre_optimizer_step", "on_step_end", "on_train_end"):
            setattr(monitor, name, clock.wrap(getattr(monitor, name)))
        trainer.add_callback(monitor)
        _time_watched_hooks(trainer, clock)
    trainer.add_callback(step_timer(clock))
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    pairs = list(zip(clock.step_ends, clock.step_ends[1:], strict=False))[SKIP:]
    return {"step_times": [b[0] - a[0] for a, b in pairs], "cpu_times": [b[1] - a[1] for a, b in pairs],
            "monitor_s": clock.inside, "total_s": total, "steps": len(clock.step_ends),
            "parameters": sum(p.numel() for p in model.parameters())}


def _time_watched_hooks(trainer, clock: Clock) -> None:
    """Count WatchedTrainer's own work: its training_step and _get_grad_norm minus the Trainer's parts."""
    from transformers import Trainer

    inner = Clock()
    outer_step, outer_norm = trainer.training_step, trainer._get_grad_norm
    base_step, base_norm = Trainer.training_step, Trainer._get_grad_norm

    def timed_base_step(self, *args, **kwargs):
        return inner.wrap(base_step)(self, *args, **kwargs)

    def timed_base_norm(self, *args, **kwargs):
        return inner.wrap(base_norm)(self, *args, **kwargs)

    def extra(outer):
        def run(*args, **kwargs):
            before_inner, start = inner.inside, time.perf_counter()
            try:
                return outer(*args, **kwargs)
            finally:
                clock.inside += (time.perf_counter() - start) - (inner.inside - before_inner)
        return run

    # The Trainer's methods are timed on the class while this trainer runs; main() puts them back after.
    Trainer.training_step, Trainer._get_grad_norm = timed_base_step, timed_base_norm
    trainer.training_step, trainer._get_grad_norm = extra(outer_step), extra(outer_norm)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each kind, interleaved")
    opts = parser.parse_args()

    import torch
    from transformers import Trainer

    from tunewise.config import load_config
    from tunewise.data import build_datasets, ensure_pad_token
    from tunewise.model import load_tokenizer
    from tunewise.task import bundled_data_dir

    base_step, base_norm = Trainer.training_step, Trainer._get_grad_norm
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = make_model_dir(tmp / "model")
        cfg = load_config(None, [f"model.name={model_dir}", "model.method=full",
                                 f"data.train={bundled_data_dir() / 'train.jsonl'}", f"output_dir={tmp}"])
        tokenizer = load_tokenizer(cfg)
        ensure_pad_token(tokenizer)
        bundle = build_datasets(cfg.data, tokenizer)
        runs: dict[str, list[dict]] = {"plain": [], "monitored": []}
        for i in range(opts.rounds):
            for kind in ("plain", "monitored"):
                runs[kind].append(one_run(model_dir, bundle, tokenizer, tmp / f"{kind}-{i}", opts.steps,
                                          kind == "monitored"))
                Trainer.training_step, Trainer._get_grad_norm = base_step, base_norm
                last = runs[kind][-1]
                print(f"round {i + 1} {kind:9} median step {statistics.median(last['step_times']):.4f} s, "
                      f"CPU {statistics.median(last['cpu_times']):.4f} s", file=sys.stderr)
    def median(kind: str, key: str) -> float:
        return statistics.median(t for r in runs[kind] for t in r[key])

    plain_median, watched_median = median("plain", "step_times"), median("monitored", "step_times")
    plain_cpu, watched_cpu = median("plain", "cpu_times"), median("monitored", "cpu_times")
    monitor_per_step = (sum(r["monitor_s"] for r in runs["monitored"])
                        / sum(r["steps"] for r in runs["monitored"]))
    result = {
        "model": {"layers": 4, "hidden": 256, "vocab": len(tokenizer), "method": "full",
                  "parameters": runs["plain"][0]["parameters"]},
        "batch": "4 examples per step, bundled contacts data (~80 tokens per example)",
        "steps_per_run": opts.steps, "rounds": opts.rounds, "skipped_first_steps": SKIP,
        "plain_median_step_s": round(plain_median, 4),
        "monitored_median_step_s": round(watched_median, 4),
        "overhead_pct_ab": round(100 * (watched_median - plain_median) / plain_median, 2),
        "plain_median_step_cpu_s": round(plain_cpu, 4),
        "monitored_median_step_cpu_s": round(watched_cpu, 4),
        "overhead_pct_ab_cpu": round(100 * (watched_cpu - plain_cpu) / plain_cpu, 2),
        "monitor_time_per_step_s": round(monitor_per_step, 6),
        "overhead_pct_direct": round(100 * monitor_per_step / plain_median, 3),
        "goal_pct": 2.0,
        "torch_threads": torch.get_num_threads(),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "processor": platform.machine(), "load_average": os.getloadavg()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
