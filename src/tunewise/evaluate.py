"""Evaluate: greedy generation on the test split, scored by exact match (and per-field accuracy for JSON).

Used by `tunewise eval RUN_DIR|--base` and the demo, so the gain from fine-tuning is a number.
"""

from __future__ import annotations

import json
import logging
import re
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
    batch_size: int = 50,  # decoding on a CPU is bound by reading the weights: bigger batches are ~free
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
    from tunewise.formats import DataError, load_conversations
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
    cfg: Config, run_dir: Path | None, limit: int | None = None, max_new_tokens: int = 40
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


# ----------------------------------------------------------------------------- memorization

# Instruction words and their synonyms for `rephrase`: common imperative verbs and phrasings.
SYNONYMS = (
    ("Extract", "Pull out"), ("extract", "pull out"), ("Convert", "Turn"), ("convert", "turn"),
    ("Summarize", "Sum up"), ("summarize", "sum up"), ("Write", "Compose"), ("write", "compose"),
    ("Explain", "Describe"), ("explain", "describe"), ("Translate", "Render"), ("translate", "render"),
    ("Give", "Provide"), ("give", "provide"), ("Classify", "Categorize"), ("classify", "categorize"),
    ("Tell me", "Let me know"), ("as JSON", "in JSON form"),
    ("the contact", "the contact details"),
)  # fmt: skip
NEAR_VERBATIM = 0.9  # normalized edit similarity at or above which a reply counts as a near-verbatim copy
MEMORIZED_MIN = 0.5  # training-prompt reproduction below this is never called memorization
MEMORIZED_GAP = 0.3  # ... nor when it is less than this far above the held-out and rephrased rates


def rephrase(text: str) -> str:
    """Lightly rephrase a prompt, deterministically; the answer it asks for stays the same.

    The first line is taken as the instruction (the whole text when it is one line):
      1. instruction synonyms: each word or phrase of `SYNONYMS` is replaced once ("Extract" ->
         "Pull out", "as JSON" -> "in JSON form", ...);
      2. casing: the first letter of the instruction flips case;
      3. punctuation: a final "." of the instruction is dropped; one is added after a bare last word;
      4. clause reordering: with several lines (instruction + input) the instruction moves after the
         input; a one-line prompt swaps the two clauses around its first ", ".
    """
    for word, synonym in SYNONYMS:
        text = re.sub(rf"\b{re.escape(word)}\b", synonym, text, count=1)
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if not lines:
        return text
    first = lines[0]
    first = (first[:1].lower() if first[:1].isupper() else first[:1].upper()) + first[1:]
    first = first[:-1] if first.endswith(".") else first if first.endswith(("?", "!", ":")) else first + "."
    if len(lines) >= 2:
        return "\n".join([*lines[1:], first])
    if ", " in first:
        head, tail = first.split(", ", 1)
        return f"{tail}, {head}"
    return first


def _rephrase_conversation(conversation: list[dict]) -> list[dict]:
    """The conversation with its last user turn before the answer rephrased."""
    prompt = [dict(m) for m in _prompt_of(conversation)]
    last_user = max((i for i, m in enumerate(prompt) if m["role"] == "user"), default=None)
    if last_user is not None:
        prompt[last_user]["content"] = rephrase(prompt[last_user]["content"])
    return [*prompt, {"role": "assistant", "content": reference_of(conversation)}]


def _normalize(text: str) -> str:
    return " ".join(text.split())


def edit_similarity(a: str, b: str) -> float:
    """1 - Levenshtein distance / length of the longer text, on whitespace-normalized texts (1.0 = same)."""
    a, b = _normalize(a), _normalize(b)
    if not a and not b:
        return 1.0
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return 1.0 - previous[-1] / max(len(a), len(b))


def reproduction(predictions: list[str], references: list[str]) -> dict[str, float]:
    """How often predictions reproduce the references: verbatim, near-verbatim, mean similarity."""
    sims = [edit_similarity(p, r) for p, r in zip(predictions, references, strict=True)]
    n = max(len(sims), 1)
    return {
        "n": len(sims),
        "verbatim": sum(_normalize(p) == _normalize(r) for p, r in zip(predictions, references, strict=True))
        / n,
        "near_verbatim": sum(s >= NEAR_VERBATIM for s in sims) / n,
        "mean_similarity": sum(sims) / n,
    }


def judge_memorization(sets: dict[str, dict[str, float]]) -> tuple[bool, str]:
    """(flagged, message): memorized when training prompts are reproduced far more than the others."""
    train, rephrased, heldout = (sets[k]["near_verbatim"] for k in ("train", "rephrased", "heldout"))
    numbers = (
        f"{train:.0%} of training responses reproduced near-verbatim from their own prompts, "
        f"{rephrased:.0%} from the same prompts lightly rephrased, {heldout:.0%} of held-out answers"
    )
    flagged = (
        train >= MEMORIZED_MIN and train - heldout >= MEMORIZED_GAP and train - rephrased >= MEMORIZED_GAP
    )
    if flagged:
        return True, (
            f"overfit/memorized: {numbers}. The model recalls training answers by their exact "
            "wording instead of doing the task; use fewer epochs, a lower learning rate or more data"
        )
    return False, f"no sign of memorization: {numbers}"


def _heldout_conversations(cfg: Config) -> list[list[dict]]:
    """Validation conversations (file or split), else the test split."""
    from tunewise.data import data_paths, split_validation
    from tunewise.formats import load_conversations

    train_path, validation_path, _ = data_paths(cfg.data)
    if validation_path is not None:
        return load_conversations(validation_path, cfg.data)[0]
    if cfg.data.validation_split:
        rows = load_conversations(train_path, cfg.data)[0]
        return split_validation(rows, cfg.data.validation_split, cfg.data.seed)[1]
    return test_conversations(cfg)


def _train_conversations(cfg: Config) -> list[list[dict]]:
    """Training conversations as the run trained on them (without a validation_split part)."""
    from tunewise.data import data_paths, split_validation
    from tunewise.formats import load_conversations

    rows = load_conversations(data_paths(cfg.data)[0], cfg.data)[0]
    if cfg.data.validation is None and cfg.data.validation_split:
        rows = split_validation(rows, cfg.data.validation_split, cfg.data.seed)[0]
    return rows


def check_memorization(cfg: Config, run_dir: Path, n: int = 20, max_new_tokens: int = 64) -> dict[str, Any]:
    """Generate for n training prompts, the same lightly rephrased, and n held-out prompts; compare.

    Measures how often the replies reproduce the TRAINING responses (verbatim and near-verbatim, see
    `NEAR_VERBATIM`), against the held-out accuracy measured the same way; flags memorization when
    training prompts are reproduced far more often than both (`judge_memorization`). Writes
    memorization.json into the run directory and returns its content.
    """
    started = time.time()
    train = [c for c in _train_conversations(cfg) if any(m["role"] == "assistant" for m in c)][:n]
    heldout = [c for c in _heldout_conversations(cfg) if any(m["role"] == "assistant" for m in c)][:n]
    rephrased = [_rephrase_conversation(c) for c in train]
    model, tokenizer = load_for_inference(cfg, run_dir)
    outputs = {
        name: generate(model, tokenizer, convs, max_new_tokens=max_new_tokens)
        for name, convs in (("train", train), ("rephrased", rephrased), ("heldout", heldout))
    }
    sets = {
        name: reproduction(outputs[name], [reference_of(c) for c in convs])
        for name, convs in (("train", train), ("rephrased", rephrased), ("heldout", heldout))
    }
    flagged, message = judge_memorization(sets)
    result = {
        "flagged": flagged,
        "verdict": "memorized" if flagged else "ok",
        "message": message,
        "threshold": NEAR_VERBATIM,
        "sets": sets,
        "seconds": round(time.time() - started, 1),
        "examples": [
            {
                "prompt": _prompt_of(c)[-1]["content"],
                "rephrased": _prompt_of(r)[-1]["content"],
                "reference": reference_of(c),
                "train_output": a,
                "rephrased_output": b,
            }
            for c, r, a, b in list(
                zip(train, rephrased, outputs["train"], outputs["rephrased"], strict=True)
            )[:3]
        ],
    }
    (Path(run_dir) / "memorization.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def prompt_conversations(cfg: Config, prompts: list[str]) -> list[list[dict]]:
    """One user turn per prompt, after the configured system prompt when there is one."""
    system = [{"role": "system", "content": cfg.data.system_prompt}] if cfg.data.system_prompt else []
    return [[*system, {"role": "user", "content": p}] for p in prompts]


def conversations_from_file(cfg: Config, path: Path) -> list[list[dict]]:
    """Prompts from a file: a data file (.jsonl/.json/.csv/.parquet, any supported format; the prompt is
    each row up to its last assistant turn) or plain text with one prompt per line."""
    from tunewise.formats import DataError, load_conversations

    if not path.is_file():
        raise DataError(f"`{path}`: no such file; pass a text file with one prompt per line or a data file")
    if path.suffix in (".jsonl", ".json", ".csv", ".parquet"):
        return [_prompt_of(c) for c in load_conversations(path, cfg.data)[0]]
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return prompt_conversations(cfg, lines)
