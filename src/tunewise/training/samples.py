"""Sample generations at the end of a run: a few validation prompts, base (adapter off) vs tuned."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunewise import rundir
from tunewise.data import EncodedExample


def _split_prompt(example: EncodedExample) -> tuple[list[int], list[int]]:
    """(prompt ids, reference ids): everything before the last trained span, and that span."""
    labels = example.labels
    end = max(i for i, label in enumerate(labels) if label != -100) + 1
    start = end
    while start > 0 and labels[start - 1] != -100:
        start -= 1
    return example.input_ids[:start], example.input_ids[start:end]


def write_samples(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[EncodedExample],
    path: Path,
    n: int = 3,
) -> None:
    """Greedy generations for a few validation prompts, base (adapter disabled) vs tuned: samples.json."""
    samples = []
    model.eval()
    for example in [e for e in examples if e.n_trained][:n]:
        prompt, reference = _split_prompt(example)
        ids = torch.tensor([prompt], device=model.device)
        row = {
            "prompt": tokenizer.decode(prompt),
            "reference": tokenizer.decode(reference, skip_special_tokens=True),
        }
        for which in ("base", "tuned"):
            disable = getattr(model, "disable_adapter", None)
            if which == "base" and disable is None:
                continue  # full fine-tuning: the base weights are gone from this model
            ctx = disable() if which == "base" else contextlib.nullcontext()
            with ctx, torch.no_grad():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=len(reference) + 16,
                    pad_token_id=tokenizer.pad_token_id,
                )
            row[which] = tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True).strip()
        samples.append(row)
    rundir.write_json(path, samples)
