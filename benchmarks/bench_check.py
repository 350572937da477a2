"""How long the pre-flight check takes on 50,000 chat examples, next to TRL preparing the same data.

tunewise: `build_datasets` (read, template, labels) and then `run_check` as a whole (it builds the data
again and runs every item). TRL: the construction of an `SFTTrainer` with completion-only loss on the same
conversations as a conversational prompt/completion dataset (tokenizing, completion masks), one process.
Both use the real SmolLM2 tokenizer and a tiny Llama built from a config, so no model weights matter.

    PYTHONPATH=src python benchmarks/bench_check.py [--n 50000]

Writes benchmarks/results/check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "fixtures" / "tokenizers" / "smollm2"
RESULTS = ROOT / "benchmarks" / "results" / "check.json"


def make_model_dir(directory: Path) -> Path:
    """A 2-layer Llama (hidden 32) saved with the SmolLM2 tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def time_tunewise(model_dir: Path, train: Path, out: Path) -> dict:
    from tunewise.check import run_check
    from tunewise.config import load_config
    from tunewise.data import build_datasets, ensure_pad_token
    from tunewise.model import load_tokenizer

    cfg = load_config(
        None, [f"model.name={model_dir}", "model.method=lora", f"data.train={train}", f"output_dir={out}"]
    )
    start = time.perf_counter()
    tokenizer = load_tokenizer(cfg)
    ensure_pad_token(tokenizer)
    bundle = build_datasets(cfg.data, tokenizer)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    report = run_check(cfg)
    check_s = time.perf_counter() - start
    # run_check builds the data itself (the same work as build_datasets) and then runs every item.
    return {
        "build_datasets_s": round(build_s, 2),
        "run_check_s": round(check_s, 2),
        "examples": len(bundle.train),
        "counts": report.counts(),
    }


def time_trl(model_dir: Path, rows: list[dict], out: Path) -> dict:
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    pairs = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]
    dataset = Dataset.from_list(pairs)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = SFTConfig(
        output_dir=str(out),
        completion_only_loss=True,
        dataset_num_proc=1,
        max_length=512,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    start = time.perf_counter()
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    seconds = time.perf_counter() - start
    return {
        "sft_trainer_init_s": round(seconds, 2),
        "examples": len(trainer.train_dataset),
        "version": trl.__version__,
        "completion_only_loss": True,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000, help="examples to generate")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from tunewise.task import generate_examples

    rows = generate_examples(args.n, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        train = tmp_path / "train.jsonl"
        train.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        model_dir = make_model_dir(tmp_path / "model")
        tunewise_numbers = time_tunewise(model_dir, train, tmp_path / "runs")
        trl_numbers = time_trl(model_dir, rows, tmp_path / "trl")
    ratio = tunewise_numbers["run_check_s"] / trl_numbers["sft_trainer_init_s"]
    result = {
        "examples": args.n,
        "tunewise": tunewise_numbers,
        "trl": trl_numbers,
        "ratio_run_check_to_trl": round(ratio, 2),
        "ratio_build_datasets_to_trl": round(
            tunewise_numbers["build_datasets_s"] / trl_numbers["sft_trainer_init_s"], 2
        ),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(
        f"{args.n} examples: tunewise build_datasets {tunewise_numbers['build_datasets_s']} s, "
        f"run_check {tunewise_numbers['run_check_s']} s; "
        f"TRL SFTTrainer init {trl_numbers['sft_trainer_init_s']} s; run_check / TRL = {ratio:.2f}"
    )
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
