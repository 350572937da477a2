"""What the live monitor costs: the same training with and without it, as a share of the step time.

Without: a plain `transformers.Trainer`. With: tunewise's `WatchedTrainer` (records each micro-batch's loss
and tokens and the pre-clip gradient norm) plus its `StepMonitor` (guards the update, writes metrics.jsonl,
feeds the doctor's CurveWatcher every step). Same model weights, data, batches and TrainingArguments.

Models (`--model`):
  - `smollm2` (default): what users run, the embedded SmolLM2-135M-Instruct with LoRA r 8 on all linear
    layers, on the bundled dataset;
  - `tiny`: a 4-layer Llama (hidden 256) with the SmolLM2 tokenizer, fully fine-tuned: a short step
    (~0.9 s), where a fixed per-step cost weighs the most.

Two measures:
  - A/B: median step time with the monitor vs without. Runs go in ABBA order (plain, monitored,
    monitored, plain, ...) so that drift and load from other processes hit both alike; each adjacent
    (plain, monitored) pair gives one paired overhead, and the spread of those pairs is the noise.
    In wall time and in this process's CPU time.
  - direct: the time spent inside the monitor's callbacks and WatchedTrainer's extra work, timed around
    each call, divided by the step time. Precise; it leaves out nothing that the monitor adds.

    PYTHONPATH=src python benchmarks/bench_monitor.py [--model smollm2|tiny] [--steps 20] [--rounds 3]

Writes benchmarks/results/monitor.json (one entry per model).
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


def load_benchmark_model(cfg, tokenizer, pad_added: bool):
    """The config's model as tunewise builds it (full or LoRA), with the same seed every time."""
    from transformers import set_seed

    from tunewise.model import load_model, resolve_hardware

    set_seed(0)
    return load_model(cfg, resolve_hardware(cfg), tokenizer, pad_added)


def one_run(cfg, bundle, tokenizer, pad_added: bool, out: Path, steps: int, monitored: bool) -> dict:
    """Train `steps` steps; per-step times, and the monitor's own time when it is attached."""
    from transformers import Trainer, TrainingArguments

    from tunewise.data import DataCollator
    from tunewise.diagnose import CurveWatcher
    from tunewise.monitor import StepMonitor, WatchedTrainer

    model = load_benchmark_model(cfg, tokenizer, pad_added)
    lr = float(cfg.training["learning_rate"])
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4,
                             gradient_accumulation_steps=1, learning_rate=lr, optim="adamw_torch",
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
        monitor = StepMonitor(trainer, run_dir, CurveWatcher(method=cfg.model.method, learning_rate=lr,
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
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


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


MODELS = {
    "smollm2": {"method": "lora", "learning_rate": 4e-4,
                "describe": "SmolLM2-135M-Instruct (embedded), LoRA r 8 all-linear"},
    "tiny": {"method": "full", "learning_rate": 1e-4,
             "describe": "4-layer Llama (hidden 256, SmolLM2 tokenizer), full fine-tuning"},
}


def paired_overheads(runs: list[tuple[str, dict]], key: str) -> list[float]:
    """Overhead (%) of each monitored run against the plain run next to it in the ABBA order."""
    medians = [(kind, statistics.median(r[key])) for kind, r in runs]
    pairs = [(medians[i], medians[i + 1]) for i in range(0, len(medians) - 1, 2)]
    out = []
    for a, b in pairs:
        plain, watched = (a[1], b[1]) if a[0] == "plain" else (b[1], a[1])
        out.append(round(100 * (watched - plain) / plain, 2))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="ABBA rounds (4 runs each)")
    opts = parser.parse_args()

    import torch
    from transformers import Trainer

    from tunewise.config import load_config
    from tunewise.data import build_datasets, ensure_pad_token
    from tunewise.model import load_tokenizer
    from tunewise.task import bundled_data_dir

    spec = MODELS[opts.model]
    base_step, base_norm = Trainer.training_step, Trainer._get_grad_norm
    order = [kind for _ in range(opts.rounds) for kind in ("plain", "monitored", "monitored", "plain")]
    runs: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        name = str(make_model_dir(tmp / "model")) if opts.model == "tiny" else "smollm2-135m-instruct"
        cfg = load_config(None, [f"model.name={name}", f"model.method={spec['method']}",
                                 f"training.learning_rate={spec['learning_rate']}",
                                 "adapter.target_modules=all-linear", "training.gradient_checkpointing=false",
                                 f"data.train={bundled_data_dir() / 'train.jsonl'}", f"output_dir={tmp}"])
        tokenizer = load_tokenizer(cfg)
        pad_added = ensure_pad_token(tokenizer)
        bundle = build_datasets(cfg.data, tokenizer)
        for i, kind in enumerate(order):
            run = one_run(cfg, bundle, tokenizer, pad_added, tmp / f"{kind}-{i}", opts.steps,
                          kind == "monitored")
            Trainer.training_step, Trainer._get_grad_norm = base_step, base_norm
            runs.append((kind, run))
            wall, cpu = statistics.median(run["step_times"]), statistics.median(run["cpu_times"])
            print(f"run {i + 1}/{len(order)} {kind:9} median step {wall:.4f} s, CPU {cpu:.4f} s",
                  file=sys.stderr)

    def median(kind: str, key: str) -> float:
        return statistics.median(t for k, r in runs if k == kind for t in r[key])

    watched = [r for k, r in runs if k == "monitored"]
    plain_median, watched_median = median("plain", "step_times"), median("monitored", "step_times")
    plain_cpu, watched_cpu = median("plain", "cpu_times"), median("monitored", "cpu_times")
    monitor_per_step = sum(r["monitor_s"] for r in watched) / sum(r["steps"] for r in watched)
    pairs_wall, pairs_cpu = paired_overheads(runs, "step_times"), paired_overheads(runs, "cpu_times")
    entry = {
        "model": {"describe": spec["describe"], "parameters": runs[0][1]["parameters"],
                  "trainable": runs[0][1]["trainable"], "method": spec["method"]},
        "batch": "4 examples per step, bundled contacts data (~80 tokens per example)",
        "order": "ABBA", "steps_per_run": opts.steps, "rounds": opts.rounds, "skipped_first_steps": SKIP,
        "plain_median_step_s": round(plain_median, 4),
        "monitored_median_step_s": round(watched_median, 4),
        "overhead_pct_ab": round(100 * (watched_median - plain_median) / plain_median, 2),
        "paired_overheads_pct": pairs_wall,
        "paired_overhead_median_pct": round(statistics.median(pairs_wall), 2),
        "plain_median_step_cpu_s": round(plain_cpu, 4),
        "monitored_median_step_cpu_s": round(watched_cpu, 4),
        "overhead_pct_ab_cpu": round(100 * (watched_cpu - plain_cpu) / plain_cpu, 2),
        "paired_overheads_cpu_pct": pairs_cpu,
        "monitor_time_per_step_s": round(monitor_per_step, 6),
        "overhead_pct_direct": round(100 * monitor_per_step / plain_median, 3),
        "goal_pct": 2.0,
        "torch_threads": torch.get_num_threads(),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "processor": platform.machine(), "load_average": os.getloadavg()},
    }
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if "model" in results:  # the old single-model layout
        results = {}
    results[opts.model] = entry
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(entry, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
