"""Evaluate: is the tuned model better? Base and tuned side by side on the test split.

Two measurements, both on exactly what training trains:
  - teacher-forced loss and perplexity on the test (and validation) conversations, encoded by the
    same pipeline as training (`data.encode_conversation`: the same template, masks, truncation), so
    the numbers mean something for any data;
  - greedy generation for each test prompt, scored against its reference by the metrics
    `tunewise.metrics` chooses (or `eval.metrics`, plus the user's `eval.metric`).

`compare` writes eval.json (both models' numbers) and eval.jsonl (one line per example: prompt,
reference, both answers, their scores) into the run directory. `evaluate` measures one model (the
demo and `eval --base`). Library code: progress goes to a callback, nothing is printed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunewise.config import Config
from tunewise.data import (
    DataCollator,
    EncodedExample,
    data_paths,
    encode_conversation,
    ensure_pad_token,
    split_validation,
)
from tunewise.errors import ConfigError, DataError
from tunewise.formats import load_conversations, problem_lines
from tunewise.metrics import (
    METRICS,
    UserMetric,
    choose_metrics,
    load_user_metric,
    mean_scores,
    primary_metric,
    rank_changes,
    score_examples,
)
from tunewise.model import load_base_model, load_tokenizer, resolve_hardware
from tunewise.rundir import EVAL, EVAL_EXAMPLES, write_json, write_jsonl

# (what is running, done, total): e.g. ("tuned: generating", 32, 100); the CLI draws the bar.
ProgressFn = Callable[[str, int, int], None]
EXAMPLES_KEPT = 5  # examples copied into eval.json; all of them are in eval.jsonl
CHANGES_LISTED = 3  # worst regressions and best gains returned (the report and the CLI list them)
LOSS_BATCH = 8  # sequences per teacher-forced forward pass (logits are batch x length x vocabulary)


def load_for_inference(cfg: Config, run_dir: Path | None) -> tuple[Any, Any]:
    """(model, tokenizer): the base as it was trained (4-bit for qlora) plus the run's adapter, if any."""

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


# ----------------------------------------------------------------------------- generation


def generate(
    model: Any,
    tokenizer: Any,
    conversations: list[list[dict]],
    max_new_tokens: int = 64,
    batch_size: int = 50,  # decoding on a CPU is bound by reading the weights: bigger batches are ~free
    sample: bool = False,
    temperature: float = 0.7,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Generate one reply per conversation (the prompt is everything before the last assistant turn).

    Prompts are batched by length (less padding), left-padded; replies come back in the input order.
    `progress(done, total)` is called after each batch.
    """
    tokenizer.padding_side = "left"
    prompts = [
        tokenizer.apply_chat_template(prompt_of(c), add_generation_prompt=True, tokenize=False)
        for c in conversations
    ]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        enc = tokenizer(
            [prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False
        )
        enc = enc.to(model.device)
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
        for i, row in zip(batch, out[:, enc["input_ids"].shape[1] :], strict=True):
            outputs[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
        if progress is not None:
            progress(min(start + batch_size, len(order)), len(order))
    return outputs


def prompt_of(conversation: list[dict]) -> list[dict]:
    """The conversation up to (not including) its last assistant turn."""
    last = max((i for i, m in enumerate(conversation) if m["role"] == "assistant"), default=len(conversation))
    return conversation[:last]


def reference_of(conversation: list[dict]) -> str:
    """The last assistant turn's text: what a generated reply is compared with."""
    return next(m["content"] for m in reversed(conversation) if m["role"] == "assistant")


def cap_new_tokens(tokenizer: Any, references: list[str]) -> tuple[int, str]:
    """(max_new_tokens, why): the longest reference in tokens plus a quarter (at least 8) of room."""
    longest = max((len(tokenizer(r, add_special_tokens=False).input_ids) for r in references), default=0)
    cap = longest + max(8, math.ceil(longest / 4))
    return cap, f"longest reference {longest} tokens + {cap - longest}"


# ----------------------------------------------------------------------------- the sets


@dataclass
class EvalSet:
    """Conversations to evaluate, with where each came from (file:line) and its reference answer."""

    name: str  # test | validation
    conversations: list[list[dict]]
    sources: list[str]

    @property
    def references(self) -> list[str]:
        return [reference_of(c) for c in self.conversations]


def _load_set(name: str, path: Path, cfg: Config, limit: int | None) -> EvalSet:
    """A split from its file; every row must end with an assistant turn (the reference)."""

    conversations, sources, _ = load_conversations(path, cfg.data)
    if limit:
        conversations, sources = conversations[:limit], sources[:limit]
    missing = [
        f"{s}: no assistant turn"
        for s, c in zip(sources, conversations, strict=True)
        if not any(m["role"] == "assistant" for m in c)
    ]
    if missing:
        raise DataError(
            f"{len(missing)} {name} row(s) have no answer to compare with:\n{problem_lines(missing)}\n"
            "eval compares each generated reply with the row's last assistant turn: give every "
            "row one (plain-text rows, `format: text`, have none)"
        )
    return EvalSet(name, conversations, sources)


def load_test_set(cfg: Config, limit: int | None = None) -> EvalSet:
    """The test split: `data.test`, or the bundled test split with the bundled data."""

    path = data_paths(cfg.data)[2]
    if path is None:
        raise DataError(
            "there is no test split to evaluate: set `data.test` to a file of held-out "
            "conversations (the same format as `data.train`), e.g. `data.test=data/test.jsonl`"
        )
    return _load_set("test", path, cfg, limit)


def load_validation_set(cfg: Config, limit: int | None = None) -> EvalSet | None:
    """Validation conversations as training evaluated them (file or seeded split); None without any."""

    train_path, validation_path, _ = data_paths(cfg.data)
    if validation_path is not None:
        return _load_set("validation", validation_path, cfg, limit)
    if not cfg.data.validation_split:
        return None
    rows, sources, _ = load_conversations(train_path, cfg.data)
    held = split_validation(list(zip(rows, sources, strict=True)), cfg.data.validation_split, cfg.data.seed)[
        1
    ]
    held = held[:limit] if limit else held
    return EvalSet("validation", [r for r, _ in held], [s for _, s in held])


# ----------------------------------------------------------------------------- loss


def encode_set(eval_set: EvalSet, tokenizer: Any, cfg: Config) -> list[EncodedExample | None]:
    """Each conversation as training encodes it (template, masks, truncation); None where training
    would leave it out (dropped as too long, or no trained token)."""

    out: list[EncodedExample | None] = []
    for conversation, source in zip(eval_set.conversations, eval_set.sources, strict=True):
        example = encode_conversation(conversation, tokenizer, cfg.data, source)
        out.append(example if example is not None and example.n_trained else None)
    return out


def example_losses(
    model: Any, examples: list[EncodedExample | None], pad_token_id: int, batch_size: int = LOSS_BATCH
) -> list[tuple[float, int] | None]:
    """(summed negative log-likelihood, trained tokens) per example: teacher-forced on its labels."""

    collate = DataCollator(pad_token_id=pad_token_id)
    present = [i for i, e in enumerate(examples) if e is not None]
    out: list[tuple[float, int] | None] = [None] * len(examples)
    for start in range(0, len(present), batch_size):
        batch = present[start : start + batch_size]
        tensors = collate([{"input_ids": examples[i].input_ids, "labels": examples[i].labels} for i in batch])
        tensors = {k: v.to(model.device) for k, v in tensors.items()}
        with torch.no_grad():
            logits = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits
        labels = tensors["labels"][:, 1:]  # labels align with input_ids: position t predicts t + 1
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
        )
        for row, i in enumerate(batch):
            out[i] = (float(nll[row].sum()), int((labels[row] != -100).sum()))
    return out


def summarize_loss(losses: list[tuple[float, int] | None]) -> dict[str, Any]:
    """Token-weighted mean loss over the examples and its perplexity, exp(loss)."""
    total = sum(x[0] for x in losses if x)
    tokens = sum(x[1] for x in losses if x)
    loss = total / tokens if tokens else math.nan
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if tokens and loss < 700 else math.inf if tokens else math.nan,
        "tokens": tokens,
        "examples": sum(1 for x in losses if x),
        "left_out": sum(1 for x in losses if not x),  # dropped as too long or with no trained token
    }


# ----------------------------------------------------------------------------- one model


@dataclass
class ModelEval:
    """One model's results: the summary (eval.json) and the per-example detail (eval.jsonl)."""

    summary: dict[str, Any]
    predictions: list[str]
    scores: list[dict[str, float | None]]
    errors: list[dict[str, str]]
    losses: list[float | None] = field(default_factory=list)  # per test example: mean loss per token


def _evaluate_model(
    cfg: Config,
    run_dir: Path | None,
    test: EvalSet,
    validation: EvalSet | None,
    names: list[str],
    user: UserMetric | None,
    max_new_tokens: int | None,
    progress: ProgressFn | None,
) -> ModelEval:
    """Load one model (base when run_dir is None), measure the loss, generate, score."""
    which = "tuned" if run_dir is not None else "base"
    started = time.time()
    model, tokenizer = load_for_inference(cfg, run_dir)
    summary: dict[str, Any] = {"which": which, "n": len(test.conversations)}
    per_example: list[tuple[float, int] | None] = []
    for eval_set in (test, validation):
        if eval_set is None:
            continue
        if progress:
            progress(f"{which}: loss on {eval_set.name}", 0, len(eval_set.conversations))
        losses = example_losses(model, encode_set(eval_set, tokenizer, cfg), tokenizer.pad_token_id)
        if progress:
            progress(f"{which}: loss on {eval_set.name}", len(losses), len(losses))
        for key, value in summarize_loss(losses).items():
            summary[f"{eval_set.name}_{key}"] = value
        if eval_set is test:
            per_example = losses
    if max_new_tokens is None:
        max_new_tokens = cap_new_tokens(tokenizer, test.references)[0]
    label = f"{which}: generating"
    generation_started = time.time()
    predictions = generate(
        model,
        tokenizer,
        test.conversations,
        max_new_tokens=max_new_tokens,
        batch_size=cfg.eval.batch_size,
        progress=(lambda done, total: progress(label, done, total)) if progress else None,
    )
    summary["generation_seconds"] = round(time.time() - generation_started, 2)
    scored = score_examples(predictions, test.references, names, user)
    summary.update(mean_scores(scored.scores))
    failed = sum(1 for e in scored.errors if e)
    if failed:
        summary["metric_failures"] = failed
    summary["seconds"] = round(time.time() - started, 1)
    summary["examples"] = [
        {"prompt": prompt_text(c), "reference": r, "prediction": p}
        for c, r, p in list(zip(test.conversations, test.references, predictions, strict=True))[
            :EXAMPLES_KEPT
        ]
    ]
    del model
    return ModelEval(
        summary, predictions, scored.scores, scored.errors, [x[0] / x[1] if x else None for x in per_example]
    )


def prompt_text(conversation: list[dict]) -> str:
    """The last user turn before the answer (what eval.jsonl and the report show as the prompt)."""
    prompt = prompt_of(conversation)
    return next(
        (m["content"] for m in reversed(prompt) if m["role"] == "user"),
        prompt[-1]["content"] if prompt else "",
    )


@dataclass
class _Plan:
    """What both models are measured on, settled before any model is loaded."""

    test: EvalSet
    validation: EvalSet | None
    names: list[str]
    why: str
    user: UserMetric | None


def _plan(cfg: Config, limit: int | None) -> _Plan:
    """Sets, metrics and the user's metric: every input error is raised here, before the slow part."""
    bad = [f"`eval.{k}` is {v}; must be >= 1" for k, v in vars(cfg.eval).items()
           if k in ("batch_size", "max_new_tokens") and v is not None and v < 1]  # fmt: skip
    if bad:
        raise ConfigError(bad)
    test = load_test_set(cfg, limit)
    user = load_user_metric(cfg.eval.metric) if cfg.eval.metric else None
    names, why = choose_metrics(test.references, cfg.eval.metrics)
    if user is not None and user.name in METRICS:
        raise ConfigError(
            [
                f"`eval.metric: {user.spec}`: `{user.name}` is the name of a built-in metric; "
                "rename your function"
            ]
        )
    return _Plan(test, load_validation_set(cfg, limit), names, why, user)


def evaluate(
    cfg: Config,
    run_dir: Path | None,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """One model on the test split (run_dir None: the base model): loss, perplexity, generation metrics.

    Returns:
        The summary: `which`, `n`, each metric's mean, `test_loss`, `test_perplexity` (and
        `validation_*`), timings and the first examples.
    """
    plan = _plan(cfg, limit)
    max_new_tokens = max_new_tokens or cfg.eval.max_new_tokens
    return _evaluate_model(
        cfg, run_dir, plan.test, plan.validation, plan.names, plan.user, max_new_tokens, progress
    ).summary


def compare(
    cfg: Config, run_dir: Path, limit: int | None = None, progress: ProgressFn | None = None
) -> dict[str, Any]:
    """Base and tuned model side by side on the test split; writes eval.json and eval.jsonl into run_dir.

    Returns:
        eval.json's content: `base` and `tuned` summaries (see `evaluate`), the metrics and why they
        were chosen, `max_new_tokens` and where it came from, the primary metric and the worst
        regressions and best gains by it.
    """
    plan = _plan(cfg, limit)
    if cfg.eval.max_new_tokens:
        max_new_tokens, why_tokens = cfg.eval.max_new_tokens, "set by eval.max_new_tokens"
    else:
        max_new_tokens, why_tokens = cap_new_tokens(load_tokenizer(cfg), plan.test.references)
    base = _evaluate_model(
        cfg, None, plan.test, plan.validation, plan.names, plan.user, max_new_tokens, progress
    )
    tuned = _evaluate_model(
        cfg, run_dir, plan.test, plan.validation, plan.names, plan.user, max_new_tokens, progress
    )
    primary = primary_metric(plan.names, plan.user.name if plan.user else None)
    records = _records(plan.test, base, tuned, primary)
    write_jsonl(run_dir / EVAL_EXAMPLES, records)
    regressions, gains = rank_changes(records, CHANGES_LISTED)
    result = {
        "base": base.summary,
        "tuned": tuned.summary,
        "metrics": plan.names + ([plan.user.name] if plan.user else []),
        "metrics_chosen": plan.why,
        "user_metric": plan.user.spec if plan.user else None,
        "primary_metric": primary,
        "max_new_tokens": max_new_tokens,
        "max_new_tokens_from": why_tokens,
        "examples_file": EVAL_EXAMPLES,
        "regressions": regressions,
        "gains": gains,
    }
    write_json(run_dir / EVAL, result)
    return result


def _records(test: EvalSet, base: ModelEval, tuned: ModelEval, primary: str) -> list[dict[str, Any]]:
    """eval.jsonl: one object per test example."""
    records = []
    for i, (conversation, source) in enumerate(zip(test.conversations, test.sources, strict=True)):
        b, t = base.scores[i].get(primary), tuned.scores[i].get(primary)
        record: dict[str, Any] = {
            "index": i,
            "source": source,
            "prompt": prompt_text(conversation),
            "reference": reference_of(conversation),
            "base": base.predictions[i],
            "tuned": tuned.predictions[i],
            "scores": {"base": base.scores[i], "tuned": tuned.scores[i]},
            "loss": {"base": base.losses[i], "tuned": tuned.losses[i]},
            "change": t - b if b is not None and t is not None else None,  # tuned - base, primary metric
        }
        if base.errors[i] or tuned.errors[i]:
            record["errors"] = {"base": base.errors[i], "tuned": tuned.errors[i]}
        records.append(record)
    return records


# ----------------------------------------------------------------------------- prompts for `generate`


def prompt_conversations(cfg: Config, prompts: list[str]) -> list[list[dict]]:
    """One user turn per prompt, after the configured system prompt when there is one."""
    system = [{"role": "system", "content": cfg.data.system_prompt}] if cfg.data.system_prompt else []
    return [[*system, {"role": "user", "content": p}] for p in prompts]


def conversations_from_file(cfg: Config, path: Path) -> list[list[dict]]:
    """Prompts from a file: a data file (.jsonl/.json/.csv/.parquet, any supported format; the prompt is
    each row up to its last assistant turn) or plain text with one prompt per line."""

    if not path.is_file():
        raise DataError(f"`{path}`: no such file; pass a text file with one prompt per line or a data file")
    if path.suffix in (".jsonl", ".json", ".csv", ".parquet"):
        return [prompt_of(c) for c in load_conversations(path, cfg.data)[0]]
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return prompt_conversations(cfg, lines)
