"""Run by test_multinode.py under torchrun (2 processes, gloo on the CPU): load_best_model_at_end in DDP.

python -m torch.distributed.run --standalone --nproc-per-node 2 tests/training/ddp_best_script.py MODEL OUT

A full fine-tune of the tiny model with tunewise's CrashSafeTrainer: evaluation and a checkpoint every
2 steps for 6 steps, the best checkpoint loaded at the end. `greater_is_better` on the eval loss makes
an early checkpoint the best one while the loss falls, so loading it changes the weights. Each rank writes
to OUT/rank<R>.json the best checkpoint its Trainer state names and a fingerprint of its weights after
training; rank 0 adds the fingerprint of the best checkpoint's saved weights.
"""

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainingArguments

from tunewise.training.checkpoints import CrashSafeTrainer


def _examples(n: int = 32, length: int = 16) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(5, 200, (length,), generator=generator)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


def _fingerprint(tensors: dict[str, torch.Tensor]) -> float:
    """One number per set of weights: the sum of |w| over every tensor."""
    return float(sum(t.detach().double().abs().sum() for t in tensors.values()))


def main() -> None:
    model_dir, out = sys.argv[1], Path(sys.argv[2])
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = TrainingArguments(
        output_dir=str(out / "run"),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_steps=6,
        learning_rate=1e-3,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=True,  # the first checkpoint is the best while the loss falls
        ddp_backend="gloo",
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        report_to=[],
        disable_tqdm=True,
    )
    data = _examples()
    trainer = CrashSafeTrainer(model=model, args=args, train_dataset=data, eval_dataset=data[:8])
    trainer.train()
    best = trainer.state.best_model_checkpoint
    seen = {
        "best": best,
        "best_is_dir": bool(best) and Path(best).is_dir(),
        "weights": _fingerprint(dict(trainer.model.named_parameters())),  # tied ones once
    }
    if trainer.args.should_save and best:
        seen["best_saved"] = _fingerprint(load_file(str(Path(best) / "model.safetensors")))
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main()
