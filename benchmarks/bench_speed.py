"""Speed side by side: tunewise `train` against TRL's `SFTTrainer`, same machine, same sitting.

Model: the embedded SmolLM2-135M-Instruct, LoRA r 8 / alpha 16 / dropout 0.05 on all linear layers, bf16
where the CPU has it. Data: the bundled contacts set (uniform lengths, max length 128 as in the demo) and a
generated chat set whose examples spread evenly over about 20-400 tokens (max length 512).

Runs, one child process each (so each peak memory is its own), in this order per dataset so that the
load of a shared machine falls on both tools alike:
  - `tunewise`: `tunewise.training.run.train` with its defaults for batching (padding-free);
  - `trl_matched`: SFTTrainer on tunewise's own tokenized examples (the same input_ids and labels), with
    our batch, accumulation, max length, optimizer, precision, schedule and steps; padded batches (its
    default collator);
  - `tunewise_padded`: tunewise with `data.batching=padded`, to show what padding-free buys by itself;
  - `trl_padding_free`: trl_matched with `padding_free=True` (TRL allows it on sdpa: transformers builds the
    block-diagonal mask from position_ids);
  - `trl_defaults`: SFTTrainer as it comes (SFTConfig defaults: batch 8 x 1, gradient checkpointing, lr 2e-5,
    max_length 1024, loss on every token of the conversation) on the raw conversations, with only the steps,
    the LoRA adapter and CPU placement set. It trains on every token, so compare all tokens/s with it.

Every number is taken the same way for every run: the time between the ends of consecutive optimizer steps
(data loading included), over the steps after the first (warm-up), and token counts from the batches the
model received (`tunewise.batching.batch_counts`: trained = loss targets, tokens = real tokens, positions =
computed positions, padding included). MFU: model FLOPs (tunewise.training.cost.StepCost: 4N +
2N_trainable per token plus the attention pairs, padding not counted)
over the matmul peak measured at the start.

    PYTHONPATH=src python benchmarks/bench_speed.py [--steps 8] [--datasets bundled,varied] [--runs R1,R2]
        [--runs-for bundled=tunewise,trl_matched] [--model NAME]

The numbers in benchmarks/results/speed.json were taken on a shared 2-core machine under heavy load from
other work (load average ~18), so with few steps: `--steps 4 --datasets varied,bundled
--runs tunewise,trl_matched,trl_padding_free,trl_defaults --runs-for bundled=tunewise,trl_matched`.

Writes benchmarks/results/speed.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tunewise.cli import _steady_cpu_memory

if "--child" in sys.argv:
    # tunewise's CLI caps oneDNN's kernel cache and fixes glibc's mmap threshold before torch starts;
    # every run here gets the same settings, TRL's too, so the ratios compare the training loops.
    _steady_cpu_memory()

from transformers import TrainerCallback

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "speed.json"
RUNS = ("tunewise", "trl_matched", "tunewise_padded", "trl_padding_free", "trl_defaults")
MAX_LENGTH = {"bundled": 128, "varied": 512}
# What both tools are given when settings are matched (the demo's, with tunewise's batch geometry).
MATCHED = {
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "learning_rate": 2e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0,
    "weight_decay": 0.001,
    "max_grad_norm": 0.3,
    "optim": "adamw_torch",
    "gradient_checkpointing": False,
    "seed": 42,
}
MONITOR_KEYS = ("step", "step_time", "tokens", "trained_tokens", "padding_fraction", "mfu")
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear"}
WORDS = (
    "river stone cloud apple window garden yellow quiet orange market silver engine paper candle forest "
    "winter basket pencil mirror ladder rocket violin harbor meadow tunnel planet copper velvet island "
    "lantern thunder pepper marble saddle feather circus blanket kettle compass"
).split()


# ----------------------------------------------------------------------------- data


def _chat(words: list[str]) -> list[dict[str, str]]:
    keep = max(1, len(words) // 4)
    return [  # a short system message: SmolLM2's template would add a 30-token one
        {"role": "system", "content": "Answer."},
        {"role": "user", "content": f"Repeat the last {keep} words: {' '.join(words)}"},
        {"role": "assistant", "content": " ".join(words[-keep:])},
    ]


def make_varied_chat(path: Path, tokenizer: Any, n: int = 160, seed: int = 0) -> list[int]:
    """Write `n` chats whose templated lengths spread evenly over ~20-400 tokens; returns the lengths."""
    rng = random.Random(seed)

    def length(words: list[str]) -> int:
        text = tokenizer.apply_chat_template(_chat(words), tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    rows, lengths = [], []
    for i in range(n):
        target = 20 + (380 * i) // max(n - 1, 1)
        pool = [rng.choice(WORDS) for _ in range(400)]
        low, high = 1, len(pool)  # the fewest words whose chat reaches the target length
        while low < high:
            mid = (low + high) // 2
            low, high = (mid + 1, high) if length(pool[:mid]) < target else (low, mid)
        rows.append({"messages": _chat(pool[:low])})
        lengths.append(length(pool[:low]))
    rng.shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return lengths


# ----------------------------------------------------------------------------- measuring (children)


def _step_numbers(steps: list[dict], peak: float, peak_memory: int) -> dict[str, Any]:
    """Totals over the steps after the first: tokens/s, padding, MFU; and the loss of every step."""
    timed = steps[1:] or steps
    seconds = sum(s["step_time"] for s in timed)
    trained = sum(s["trained_tokens"] for s in timed)
    tokens = sum(s["tokens"] for s in timed)
    positions = sum(s["positions"] for s in timed)
    flops = sum(s["flops"] for s in timed)
    return {
        "steps": len(steps),
        "timed_steps": len(timed),
        "step_time_s": seconds / len(timed),
        "trained_tokens_per_s": trained / seconds,
        "tokens_per_s": tokens / seconds,
        "positions_per_s": positions / seconds,
        "padding_fraction": 1 - tokens / positions if positions else 0.0,
        "mfu": flops / seconds / peak,
        "trained_tokens_per_step": trained / len(timed),
        "loss": [s["loss"] for s in steps],
        "peak_memory_bytes": peak_memory,
    }


def _peak_memory() -> int:
    """Peak memory of this run's process, as the monitor measures it (GPU allocated on CUDA, else RSS)."""
    from tunewise.training.monitor import peak_memory_bytes

    return peak_memory_bytes()


def _tunewise_config(spec: dict, out: Path, batching: str) -> Any:
    from tunewise.config import load_config

    overrides = {
        "name": f"{spec['dataset']}-{batching}",
        "output_dir": str(out),
        "model.name": spec["model"],
        "model.method": "lora",
        "adapter.r": LORA["r"],
        "adapter.alpha": LORA["lora_alpha"],
        "adapter.dropout": LORA["lora_dropout"],
        "data.max_seq_length": MAX_LENGTH[spec["dataset"]],
        "data.batching": batching,
        "training.max_steps": spec["steps"],
        "training.logging_steps": 1,
        "training.save_strategy": "no",
        "training.eval_strategy": "no",
        "training.load_best_model_at_end": False,
        "training.report_to": "none",
        **{f"training.{k}": v for k, v in MATCHED.items()},
    }
    if spec["data"]:
        overrides["data.train"] = spec["data"]
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def run_tunewise(spec: dict, out: Path, batching: str) -> dict[str, Any]:
    """tunewise `train` as users run it, measured by the same collator wrapper and clock as TRL.

    The wrapper and the clock are put in by wrapping `make_collator` and `build_trainer` of
    tunewise.training.run for this process; the run's own metrics.jsonl numbers are kept beside them.
    """
    from tunewise import rundir
    from tunewise.training import run as run_module
    from tunewise.training.cost import model_step_cost

    cfg = _tunewise_config(spec, out, batching)
    steps: list[dict] = []
    made: dict[str, Any] = {}
    make_collator, build_trainer = run_module.make_collator, run_module.build_trainer

    def counting_collator(choice: Any, pad_token_id: int) -> CountingCollator:
        made["collator"] = CountingCollator(make_collator(choice, pad_token_id))
        return made["collator"]

    def clocked_trainer(setup: Any) -> Any:
        trainer, monitor = build_trainer(setup)
        trainer.add_callback(StepClock(made["collator"], steps))
        hw = setup.prepared.hw
        made["cost"] = model_step_cost(trainer.model, hw.device, hw.device_name, hw.precision)
        return trainer, monitor

    run_module.make_collator, run_module.build_trainer = counting_collator, clocked_trainer
    started = time.perf_counter()
    result = run_module.train(cfg, hooks=run_module.TrainHooks(samples=False))
    wall = time.perf_counter() - started
    measured = _peak_memory()
    records = rundir.train_records(rundir.read_metrics(result.run_dir))
    for step, record in zip(steps, records, strict=False):
        step["loss"] = record["loss"]
        step["flops"] = made["cost"].step_flops(step["tokens"], step["attention_pairs"])
    plan = json.loads((result.run_dir / rundir.PLAN).read_text())
    estimate = (plan.get("memory") or {}).get("peak")
    numbers = _step_numbers(steps, _peak(), measured)
    numbers |= {
        "status": result.status,
        "error": result.error,
        "wall_s": wall,
        "batching": plan.get("batching"),
        "memory_estimate_bytes": estimate,
        "memory_estimate_error": (measured - estimate) / estimate if estimate else None,
        "monitor_records": [
            {
                k: r.get(k)
                for k in ("step", "step_time", "tokens", "trained_tokens", "padding_fraction", "mfu")
            }
            for r in records
        ],
    }
    return numbers


class CountingCollator:
    """Wraps a collator and records the token counts of every batch it makes."""

    def __init__(self, inner: Any):
        self.inner, self.batches = inner, []  # one dict of counts per batch

    def __call__(self, features: list[dict]) -> dict:
        from tunewise.batching import batch_counts

        batch = self.inner(features)
        self.batches.append({k: int(v) for k, v in batch_counts(batch).items()})
        return batch


class StepClock(TrainerCallback):
    """Times each optimizer step and takes the counts of the batches the collator made since the last one."""

    def __init__(self, collator: CountingCollator, steps: list[dict]):
        self.collator, self.steps = collator, steps
        self.last, self.seen = time.perf_counter(), 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.last, self.seen = time.perf_counter(), 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = time.perf_counter()
        batches, self.seen = self.collator.batches[self.seen :], len(self.collator.batches)
        keys = ("trained_tokens", "tokens", "positions", "attention_pairs")
        counts = {k: sum(b.get(k, 0) for b in batches) for k in keys}
        self.steps.append({"step_time": now - self.last, **counts})
        self.last = now


def run_trl(spec: dict, out: Path, variant: str) -> dict[str, Any]:
    """TRL SFTTrainer: matched to our settings (padded or padding_free) or as it comes (defaults)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tunewise.model import resolve_hardware, resolve_model_path
    from tunewise.plan import prepare
    from tunewise.training.cost import model_step_cost

    cfg = _tunewise_config(spec, out, "padded")
    path = resolve_model_path(cfg.model.name)
    hw = resolve_hardware(cfg)
    if variant == "defaults":
        tokenizer = AutoTokenizer.from_pretrained(path)
        rows = [json.loads(line) for line in Path(spec["data_file"]).read_text().splitlines() if line.strip()]
        dataset = Dataset.from_list([{"messages": r["messages"]} for r in rows])
        args = SFTConfig(
            output_dir=str(out / "trl"),
            max_steps=spec["steps"],
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=hw.device == "cpu",
            dataloader_pin_memory=False,
            disable_tqdm=True,
        )
    else:
        prepared = prepare(
            cfg
        )  # tunewise's own tokenizer, pad token and examples: the same tokens and labels
        tokenizer = prepared.tokenizer
        bundle = prepared.bundle
        dataset = Dataset.from_dict(
            {"input_ids": [e.input_ids for e in bundle.train], "labels": [e.labels for e in bundle.train]}
        )
        args = SFTConfig(
            output_dir=str(out / "trl"),
            max_steps=spec["steps"],
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=hw.device == "cpu",
            dataloader_pin_memory=False,
            disable_tqdm=True,
            bf16=hw.precision == "bf16",
            padding_free=variant == "padding_free",
            # TRL does not truncate padding-free batches; these examples are truncated already
            max_length=None if variant == "padding_free" else MAX_LENGTH[spec["dataset"]],
            **MATCHED,
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA),
    )
    collator = CountingCollator(trainer.data_collator)
    trainer.data_collator = collator
    steps: list[dict] = []
    trainer.add_callback(StepClock(collator, steps))
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    for step, loss in zip(steps, losses, strict=False):
        step["loss"] = loss
    cost = model_step_cost(trainer.model, hw.device, hw.device_name, "bf16" if args.bf16 else "fp32")
    for step in steps:
        step["flops"] = cost.step_flops(step["tokens"], step["attention_pairs"])
    numbers = _step_numbers(steps, _peak(), _peak_memory())
    numbers |= {"status": "completed", "wall_s": wall, "attention": model.config._attn_implementation}
    return numbers


def _peak() -> float:
    """The matmul peak the parent measured (tunewise's cache: the runs' MFU uses the same)."""
    return float(os.environ["BENCH_PEAK_FLOPS"])


def child(spec: dict) -> None:
    """One run in this process; writes its numbers to spec['result']."""
    out = Path(spec["out"])
    runner = {
        "tunewise": lambda: run_tunewise(spec, out, "padding_free"),
        "tunewise_padded": lambda: run_tunewise(spec, out, "padded"),
        "trl_matched": lambda: run_trl(spec, out, "matched"),
        "trl_padding_free": lambda: run_trl(spec, out, "padding_free"),
        "trl_defaults": lambda: run_trl(spec, out, "defaults"),
    }[spec["run"]]
    try:
        numbers = runner()
    except Exception as exc:  # a failed run is recorded with its error, the benchmark goes on
        numbers = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    Path(spec["result"]).write_text(json.dumps(numbers), encoding="utf-8")


# ----------------------------------------------------------------------------- the sitting (parent)


def _ratio(a: dict, b: dict, key: str) -> float | None:
    if a.get("status") != "completed" or b.get("status") != "completed" or not b.get(key):
        return None
    return round(a[key] / b[key], 3)


def _table(results: dict[str, dict[str, dict]]) -> str:
    head = (
        "| data | run | trained tok/s | all tok/s | padding | MFU | step s | peak memory GiB "
        "| loss step 1 / last | tunewise vs this (trained tok/s) |"
    )
    lines = [head, "|" + "---|" * 10]
    for dataset, runs in results.items():
        for name, r in runs.items():
            if r.get("status") != "completed":
                lines.append(f"| {dataset} | {name} | {r.get('status')}: {r.get('error', '')[:80]} |||||||||")
                continue
            ratio = _ratio(runs.get("tunewise", {}), r, "trained_tokens_per_s")
            lines.append(
                f"| {dataset} | {name} | {r['trained_tokens_per_s']:.0f} | {r['tokens_per_s']:.0f} "
                f"| {r['padding_fraction']:.1%} | {(r['mfu'] or 0):.1%} | {r['step_time_s']:.2f} "
                f"| {r['peak_memory_bytes'] / 2**30:.2f} | {r['loss'][0]:.3f} / {r['loss'][-1]:.3f} "
                f"| {'' if name == 'tunewise' else f'{ratio}x'} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--datasets", default="bundled,varied")
    parser.add_argument("--runs", default=",".join(RUNS), help="runs for every dataset, in this order")
    parser.add_argument(
        "--runs-for", action="append", default=[], metavar="DATASET=RUNS", help="other runs for one dataset"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model.name for every run")
    parser.add_argument("--work", type=Path, help="work directory; runs already done there are kept")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    import torch

    from tunewise.config import load_config
    from tunewise.model import cache_dir, load_tokenizer, resolve_hardware, torch_dtype
    from tunewise.task import bundled_data_dir
    from tunewise.training.cost import PEAK_CACHE, peak_flops

    cfg = load_config(None, [f"model.name={args.model}", "model.method=lora"])
    hw = resolve_hardware(cfg)
    dtype = torch_dtype(hw.precision)
    tmp = args.work or Path(tempfile.mkdtemp(prefix="bench-speed-"))
    tmp.mkdir(parents=True, exist_ok=True)
    if not (tmp / "peak.json").is_file():  # one peak for every run of the work directory, resumed or not
        peak = peak_flops(hw.device, hw.device_name, dtype, cache_dir() / PEAK_CACHE, remeasure=True)
        (tmp / "peak.json").write_text(json.dumps(peak))
    peak = json.loads((tmp / "peak.json").read_text())
    os.environ["BENCH_PEAK_FLOPS"] = str(peak)
    tokenizer = load_tokenizer(cfg)
    if not (tmp / "varied_lengths.json").is_file():
        lengths = make_varied_chat(tmp / "varied.jsonl", tokenizer)
        (tmp / "varied_lengths.json").write_text(json.dumps(lengths))
    lengths = json.loads((tmp / "varied_lengths.json").read_text())
    files = {"bundled": str(bundled_data_dir() / "train.jsonl"), "varied": str(tmp / "varied.jsonl")}
    results: dict[str, dict[str, dict]] = {}
    started = time.time()
    runs_for = dict(item.split("=", 1) for item in args.runs_for)
    for dataset in args.datasets.split(","):
        results[dataset] = {}
        for run in runs_for.get(dataset, args.runs).split(","):
            spec = {
                "run": run,
                "dataset": dataset,
                "steps": args.steps,
                "model": args.model,
                "data": None if dataset == "bundled" else files[dataset],
                "data_file": files[dataset],
                "out": str(tmp / f"{dataset}-{run}"),
                "result": str(tmp / f"{dataset}-{run}.json"),
            }
            t = time.time()
            result_file = Path(spec["result"])
            if not result_file.is_file():  # a run already in the work directory is not run again
                env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
                child_run = [sys.executable, __file__, "--child", json.dumps(spec)]
                proc = subprocess.run(child_run, env=env, capture_output=True, text=True)
                if not result_file.is_file():
                    result_file.write_text(json.dumps({"status": "failed", "error": proc.stderr[-2000:]}))
            results[dataset][run] = json.loads(result_file.read_text())
            r = results[dataset][run]
            print(
                f"{dataset:8s} {run:18s} {r.get('status')} {time.time() - t:6.1f}s "
                f"trained tok/s {r.get('trained_tokens_per_s', 0):.0f}",
                file=sys.stderr,
                flush=True,
            )
    summary = {
        dataset: {
            f"vs_{name}": {
                "trained_tokens_per_s": _ratio(runs.get("tunewise", {}), r, "trained_tokens_per_s"),
                "tokens_per_s": _ratio(runs.get("tunewise", {}), r, "tokens_per_s"),
            }
            for name, r in runs.items()
            if name != "tunewise"
        }
        for dataset, runs in results.items()
    }
    out = {
        "machine": {
            "device": hw.device,
            "device_name": hw.device_name,
            "threads": torch.get_num_threads(),
            "load_average_at_end": os.getloadavg(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "dtype": str(dtype),
        "peak_matmul_flops": peak,
        "steps": args.steps,
        "settings": {"matched": MATCHED, "lora": LORA, "max_length": MAX_LENGTH},
        "varied_lengths": {"min": min(lengths), "max": max(lengths), "mean": sum(lengths) / len(lengths)},
        "order": {d: runs_for.get(d, args.runs) for d in args.datasets.split(",")},
        "wall_s": time.time() - started,
        "ratios": summary,
        "runs": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2), encoding="utf-8")
    print(_table(results))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
