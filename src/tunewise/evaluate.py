"""Evaluate: greedy generation on the test split, scored by exact match (and per-field accuracy for JSON).

Used by `tunewise eval RUN_DIR|--base` and the demo, so the gain from fine-tuning is a number.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from tunewise.config import Config

logger = logging.getLogger(__name__)


def load_for_inference(cfg: Config, run_dir: Path | None) -> tuple[Any, Any]:
    """(model, tokenizer): the base as it was trained (4-bit for qlora) plus the run's adapter, if any."""
    from tunewise.data import ensure_pad_token
    from tunewise.model import load_base_model, load_tokenizer, resolve_hardware

    hw = resolve_hardware(cfg)
    if run_dir is not None and (run_dir / "model").is_dir():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(run_dir / "model")
        model = AutoModelForCausalLM.from_pretrained(run_dir / "model", dtype=torch.float32)
        return model.eval(), tok
    tokenizer = load_tokenizer(cfg)
    if run_dir is not None and (run_dir / "adapter").is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    else:
        ensure_pad_token(tokenizer)
    model = load_base_model(cfg, hw)
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    if run_dir is not None and (run_dir / "adapter").is_dir():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, run_dir / "adapter")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def generate(
    model: Any,
    tokenizer: Any,
    conversations: list[list[dict]],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    sample: bool = False,
    temperature: float = 0.7,
) -> list[str]:
    """Generate one reply per conversation (the prompt is everything before the last assistant turn)."""
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    for start in range(0, len(conversations), batch_size):
        prompts = [
            tokenizer.apply_chat_template(_prompt_of(c), add_generation_prompt=True, tokenize=False)
            for c in conversations[start : start + batch_size]
        ]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=sample,
                temperature=temperature if sample else None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
            )
        for row in out[:, enc["input_ids"].shape[1] :]:
            outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return outputs


def _prompt_of(conversation: list[dict]) -> list[dict]:
    """The conversation up to (not including) its last assistant turn."""
    last = max((i for i, m in enumerate(conversation) if m["role"] == "assistant"), default=len(conversation))
    return conversation[:last]


def reference_of(conversation: list[dict]) -> str:
    return next(m["content"] for m in reversed(conversation) if m["role"] == "assistant")


def score(predictions: list[str], references: list[str]) -> dict[str, Any]:
    """Exact match; for JSON answers also valid-JSON rate and per-field accuracy (the task's scorer)."""
    from tunewise.task import score_predictions

    if references and all(_is_json_object(r) for r in references):
        return score_predictions(predictions, references)
    exact = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True))
    return {"n": len(references), "exact_match": exact / max(len(references), 1)}


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def test_conversations(cfg: Config) -> list[list[dict]]:
    """The test split's conversations: `data.test`, or the bundled test split with the bundled data."""
    from tunewise.data import DataError, load_conversations
    from tunewise.task import bundled_data_dir

    if cfg.data.test:
        path = Path(cfg.data.test)
    elif cfg.data.train is None:
        path = bundled_data_dir() / "test.jsonl"
    else:
        raise DataError(
            "there is no test split to evaluate: set `data.test` to a file of held-out conversations"
        )
    conversations, _, _ = load_conversations(path, cfg.data)
    return conversations


def evaluate(
    cfg: Config, run_dir: Path | None, limit: int | None = None, max_new_tokens: int = 48
) -> dict[str, Any]:
    """Generate greedily for the test split and score it; run_dir None evaluates the base model."""
    conversations = test_conversations(cfg)
    if limit:
        conversations = conversations[:limit]
    started = time.time()
    model, tokenizer = load_for_inference(cfg, run_dir)
    predictions = generate(model, tokenizer, conversations, max_new_tokens=max_new_tokens)
    references = [reference_of(c) for c in conversations]
    result = score(predictions, references)
    result["which"] = "tuned" if run_dir is not None else "base"
    result["seconds"] = round(time.time() - started, 1)
    result["examples"] = [
        {"prompt": _prompt_of(c)[-1]["content"], "reference": r, "prediction": p}
        for c, r, p in list(zip(conversations, references, predictions, strict=True))[:5]
    ]
    return result
