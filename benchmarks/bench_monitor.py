"""What the live monitor costs: the same training with and without it, as a share of the step time.

Without: a plain `transformers.Trainer`. With: tunewise's `WatchedTrainer` (records each micro-batch's loss
and tokens and the pre-clip gradient norm) plus its `StepMonitor` (guards the update, writes metrics.jsonl,
feeds the doctor's CurveWatcher every step). Same model weights, data, batches and TrainingArguments.

Models (`--model`):
  - `smollm2` (default): what users run, the embedded SmolLM2-135M-Instruct with LoRA r 8 on all linear
    layers, on the bundled dataset;
  - `tiny`: a 4-layer Llama (hidden 256) with the SmolLM2 tokenizer, fully fine-tuned: a short step
    (~0.9 s), where a fixed per-step cost weighs the most.

Designs (`--design`), each also timing the monitor directly:
  - interleaved (default): with and without the monitor in the same run. In each block of two optimizer
    steps one step, chosen at random, runs with the whole monitor (WatchedTrainer's hooks and every
    StepMonitor callback) and the other runs the plain Trainer's code. Each block gives one paired
    difference; their mean over the plain step time is the overhead, with a 95% confidence interval.
    Slow drift of the machine (runs here differ by +-6% from one another) cancels within a block.
  - abba: whole runs with and without the monitor, in ABBA order (plain, monitored, monitored, plain);
    each adjacent pair gives one overhead. Run-to-run drift makes it the noisier measure.
  - direct (always): the time spent inside the monitor's callbacks and WatchedTrainer's extra work,
    timed around each call, divided by the step time. It leaves out nothing the monitor runs, but not
    what it may cost indirectly (caches, allocator), which the paired designs catch.
In wall time and in this process's CPU time.

    PYTHONPATH=src python benchmarks/bench_monitor.py [--model smollm2|tiny] [--design interleaved|abba]
        [--steps 60] [--rounds 1]

Writes benchmarks/results/monitor.json (one entry per model and design).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
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
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )
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


def one_run(cfg, bundle, tokenizer, pad_added: bool, out: Path, steps: int, mode: str) -> dict:
    """Train `steps` steps with the monitor (`monitored`), without it (`plain`), or on half the steps
    (`interleaved`: in each block of two steps one is monitored, chosen at random). Per-step times, which
    steps were monitored, and the time spent inside the monitor's own code."""
    from transformers import Trainer, TrainingArguments

    from tunewise.data import DataCollator
    from tunewise.doctor.watcher import CurveWatcher
    from tunewise.training.monitor import StepMonitor, WatchedTrainer

    model = load_benchmark_model(cfg, tokenizer, pad_added)
    lr = float(cfg.training["learning_rate"])
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        learning_rate=lr,
        optim="adamw_torch",
        max_grad_norm=0.3,
        logging_steps=10_000,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        remove_unused_columns=False,
        dataloader_pin_memory=False,
    )
    kind = Trainer if mode == "plain" else WatchedTrainer
    collator = DataCollator(pad_token_id=tokenizer.pad_token_id)
    trainer = kind(
        model=model,
        args=args,
        train_dataset=bundle.to_hf("train"),
        data_collator=collator,
        processing_class=tokenizer,
    )
    clock = Clock()
    watched = set(range(1, steps + 1)) if mode == "monitored" else set()
    if mode == "interleaved":
        rng = random.Random(0)
        watched = {2 * block + 1 + rng.randrange(2) for block in range(steps // 2)}
    if mode != "plain":
        run_dir = out / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        monitor = StepMonitor(
            trainer,
            run_dir,
            CurveWatcher(method=cfg.model.method, learning_rate=lr, max_grad_norm=0.3, total_steps=steps),
        )
        in_step = lambda: trainer.state.global_step + 1 in watched  # noqa: E731 (before the step's end)
        after_step = lambda: trainer.state.global_step in watched  # noqa: E731 (at the step's end)
        for name, active in (("on_pre_optimizer_step", in_step), ("on_step_end", after_step)):
            setattr(monitor, name, _switch(active, clock.wrap(getattr(monitor, name))))
        monitor.on_train_end = clock.wrap(monitor.on_train_end)
        trainer.add_callback(monitor)
        _time_watched_hooks(trainer, clock, in_step)
    trainer.add_callback(step_timer(clock))
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    ends = clock.step_ends
    if mode != "plain":  # the monitor wrote one metrics.jsonl line for each step it saw, and no other
        lines = (out / "run" / "metrics.jsonl").read_text().splitlines()
        recorded = sorted(json.loads(line)["step"] for line in lines if '"train"' in line)
        assert recorded == sorted(watched), (recorded, sorted(watched))
    measured = range(SKIP + 2, len(ends) + 1)  # step s took ends[s-1] - ends[s-2]
    return {
        "step_times": {s: ends[s - 1][0] - ends[s - 2][0] for s in measured},
        "cpu_times": {s: ends[s - 1][1] - ends[s - 2][1] for s in measured},
        "watched": sorted(watched),
        "monitor_s": clock.inside,
        "total_s": total,
        "steps": len(ends),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def _switch(active, watched, plain=lambda *args, **kwargs: None):
    """Call `watched` while `active()` (a monitored step), else `plain` (by default: do nothing)."""

    def run(*args, **kwargs):
        return (watched if active() else plain)(*args, **kwargs)

    return run


def _time_watched_hooks(trainer, clock: Clock, active) -> None:
    """Count WatchedTrainer's own work: its training_step and _get_grad_norm minus the Trainer's parts.

    On a step where `active()` is false the Trainer's own methods run instead (no monitor at all).
    """
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
    trainer.training_step = _switch(active, extra(outer_step), lambda *a, **k: base_step(trainer, *a, **k))
    trainer._get_grad_norm = _switch(active, extra(outer_norm), lambda *a, **k: base_norm(trainer, *a, **k))


MODELS = {
    "smollm2": {
        "method": "lora",
        "learning_rate": 4e-4,
        "describe": "SmolLM2-135M-Instruct (embedded), LoRA r 8 all-linear",
    },
    "tiny": {
        "method": "full",
        "learning_rate": 1e-4,
        "describe": "4-layer Llama (hidden 256, SmolLM2 tokenizer), full fine-tuning",
    },
}


def _pct(part: float, whole: float) -> float:
    return round(100 * part / whole, 2)


def abba_summary(runs: list[tuple[str, dict]]) -> dict:
    """Whole runs with and without the monitor: medians, and the overhead of each adjacent pair."""

    def median(kind: str, key: str) -> float:
        return statistics.median(t for k, r in runs if k == kind for t in r[key].values())

    def paired(key: str) -> list[float]:
        meds = [(k, statistics.median(r[key].values())) for k, r in runs]
        out = []
        for a, b in zip(meds[::2], meds[1::2], strict=False):
            plain, watched = (a[1], b[1]) if a[0] == "plain" else (b[1], a[1])
            out.append(_pct(watched - plain, plain))
        return out

    plain, watched = median("plain", "step_times"), median("monitored", "step_times")
    plain_cpu, watched_cpu = median("plain", "cpu_times"), median("monitored", "cpu_times")
    return {
        "plain_median_step_s": round(plain, 4),
        "monitored_median_step_s": round(watched, 4),
        "overhead_pct": _pct(watched - plain, plain),
        "paired_overheads_pct": paired("step_times"),
        "overhead_pct_cpu": _pct(watched_cpu - plain_cpu, plain_cpu),
        "paired_overheads_cpu_pct": paired("cpu_times"),
    }


def interleaved_summary(runs: list[tuple[str, dict]]) -> dict:
    """Same-run pairs: in each block of two steps, the monitored step's time minus the other's."""
    diffs: dict[str, list[float]] = {"step_times": [], "cpu_times": []}
    plain: dict[str, list[float]] = {"step_times": [], "cpu_times": []}
    for _, run in runs:
        watched = set(run["watched"])
        for key in diffs:
            times = run[key]
            for first in range(1, run["steps"], 2):
                if first in times and first + 1 in times:
                    on, off = (first, first + 1) if first in watched else (first + 1, first)
                    diffs[key].append(times[on] - times[off])
                    plain[key].append(times[off])
    out: dict = {"pairs": len(diffs["step_times"])}
    for key, label in (("step_times", ""), ("cpu_times", "_cpu")):
        d, base = diffs[key], statistics.fmean(plain[key])
        half_width = 1.96 * statistics.stdev(d) / len(d) ** 0.5
        out[f"plain_mean_step{label}_s"] = round(base, 4)
        out[f"overhead{label}_pct"] = _pct(statistics.fmean(d), base)
        out[f"overhead{label}_pct_ci95"] = [
            _pct(statistics.fmean(d) - half_width, base),
            _pct(statistics.fmean(d) + half_width, base),
        ]
        out[f"overhead{label}_pct_median_pair"] = _pct(statistics.median(d), statistics.median(plain[key]))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--design", choices=["interleaved", "abba"], default="interleaved")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="interleaved: runs; abba: rounds of 4 runs (plain, monitored, monitored, plain)",
    )
    opts = parser.parse_args()

    import torch
    from transformers import Trainer

    from tunewise.config import load_config
    from tunewise.data import build_datasets, ensure_pad_token
    from tunewise.model import load_tokenizer
    from tunewise.task import bundled_data_dir

    spec = MODELS[opts.model]
    base_step, base_norm = Trainer.training_step, Trainer._get_grad_norm
    kinds = ("plain", "monitored", "monitored", "plain") if opts.design == "abba" else ("interleaved",)
    order = [kind for _ in range(opts.rounds) for kind in kinds]
    runs: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        name = str(make_model_dir(tmp / "model")) if opts.model == "tiny" else "smollm2-135m-instruct"
        cfg = load_config(
            None,
            [
                f"model.name={name}",
                f"model.method={spec['method']}",
                f"training.learning_rate={spec['learning_rate']}",
                "adapter.target_modules=all-linear",
                "training.gradient_checkpointing=false",
                f"data.train={bundled_data_dir() / 'train.jsonl'}",
                f"output_dir={tmp}",
            ],
        )
        tokenizer = load_tokenizer(cfg)
        pad_added = ensure_pad_token(tokenizer)
        bundle = build_datasets(cfg.data, tokenizer)
        for i, kind in enumerate(order):
            run = one_run(cfg, bundle, tokenizer, pad_added, tmp / f"{kind}-{i}", opts.steps, kind)
            Trainer.training_step, Trainer._get_grad_norm = base_step, base_norm
            runs.append((kind, run))
            wall = statistics.median(run["step_times"].values())
            print(f"run {i + 1}/{len(order)} {kind:11} median step {wall:.4f} s", file=sys.stderr)

    watched_steps = sum(len(r["watched"]) for _, r in runs)
    monitor_per_step = sum(r["monitor_s"] for _, r in runs) / max(watched_steps, 1)
    summary = interleaved_summary(runs) if opts.design == "interleaved" else abba_summary(runs)
    typical = statistics.median(t for _, r in runs for t in r["step_times"].values())
    entry = {
        "model": {
            "describe": spec["describe"],
            "parameters": runs[0][1]["parameters"],
            "trainable": runs[0][1]["trainable"],
            "method": spec["method"],
        },
        "batch": "4 examples per step, bundled contacts data (~80 tokens per example)",
        "steps_per_run": opts.steps,
        "runs": len(order),
        "skipped_first_steps": SKIP,
        **summary,
        "monitor_time_per_step_s": round(monitor_per_step, 6),
        "overhead_pct_direct": round(100 * monitor_per_step / typical, 3),
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
    if "model" in results:  # the old single-model layout
        results = {}
    results.setdefault(opts.model, {})[opts.design] = entry
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(entry, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
