"""Memorization: does the tuned model do the task, or only recall training answers by their wording?

`check_memorization` generates for n training prompts as they were trained, for the same prompts
reworded, and for n held-out prompts, and compares how often each set reproduces its reference
(near-)verbatim, next to the teacher-forced loss of the training and held-out answers. The rewording
is the user's (`eval.rephrased`: a data file of training rows whose prompts are reworded and whose
answers are kept) or tunewise's own light perturbation (`rephrase`); the result says which.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from tunewise.config import Config
from tunewise.data import data_paths, split_validation
from tunewise.errors import DataError
from tunewise.evaluate import (
    EvalSet,
    cap_new_tokens,
    encode_set,
    example_losses,
    generate,
    load_for_inference,
    load_test_set,
    load_validation_set,
    prompt_of,
    prompt_text,
    reference_of,
    summarize_loss,
)
from tunewise.formats import load_conversations, problem_lines
from tunewise.rundir import MEMORIZATION, write_json

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
PERTURBATION = (
    "tunewise's perturbation of each prompt's last user turn: instruction synonyms, the first letter's "
    "case, the final full stop, clause order (set `eval.rephrased` to a file of your own rewordings)"
)


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
    prompt = [dict(m) for m in prompt_of(conversation)]
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


def judge_memorization(
    sets: dict[str, dict[str, float]], reworded: str = "lightly rephrased"
) -> tuple[bool, str]:
    """(flagged, message): memorized when training prompts are reproduced far more than the others."""
    train, rephrased, heldout = (sets[k]["near_verbatim"] for k in ("train", "rephrased", "heldout"))
    numbers = (
        f"{train:.0%} of training responses reproduced near-verbatim from their own prompts, "
        f"{rephrased:.0%} from the same prompts {reworded}, {heldout:.0%} of held-out answers"
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


# ----------------------------------------------------------------------------- the three sets


def _with_answers(eval_set: EvalSet) -> EvalSet:
    """Only the rows that end with an answer (plain-text rows have none)."""
    keep = [i for i, c in enumerate(eval_set.conversations) if any(m["role"] == "assistant" for m in c)]
    return EvalSet(
        eval_set.name, [eval_set.conversations[i] for i in keep], [eval_set.sources[i] for i in keep]
    )


def _train_set(cfg: Config) -> EvalSet:
    """Training conversations as the run trained on them (without a validation_split part)."""

    rows, sources, _ = load_conversations(data_paths(cfg.data)[0], cfg.data)
    pairs = list(zip(rows, sources, strict=True))
    if cfg.data.validation is None and cfg.data.validation_split:
        pairs = split_validation(pairs, cfg.data.validation_split, cfg.data.seed)[0]
    train = _with_answers(EvalSet("train", [r for r, _ in pairs], [s for _, s in pairs]))
    if not train.conversations:
        raise DataError(
            "the memorization check needs training rows with an answer (an assistant turn); "
            "plain-text rows (`format: text`) have none"
        )
    return train


def _user_rephrasings(cfg: Config, train: EvalSet, n: int) -> tuple[EvalSet, EvalSet]:
    """(training rows, their rewordings) from `eval.rephrased`, paired by the answer they keep.

    Raises:
        DataError: naming each row whose answer is no training row's answer, or whose prompt is not
            reworded at all.
    """

    path = Path(cfg.eval.rephrased)
    rows, sources, _ = load_conversations(path, cfg.data)
    by_answer: dict[str, int] = {}
    for i, conversation in enumerate(train.conversations):
        by_answer.setdefault(_normalize(reference_of(conversation)), i)
    pairs, problems = [], []
    for row, source in zip(rows, sources, strict=True):
        if not any(m["role"] == "assistant" for m in row):
            problems.append(f"{source}: no assistant turn (the training answer the rewording must keep)")
            continue
        i = by_answer.get(_normalize(reference_of(row)))
        if i is None:
            problems.append(f"{source}: its answer is not the answer of any training row")
        elif prompt_text(row) == prompt_text(train.conversations[i]):
            problems.append(
                f"{source}: its prompt is the training prompt of {train.sources[i]}, not reworded"
            )
        else:
            pairs.append((i, row, source))
    if problems:
        raise DataError(
            f"`eval.rephrased: {path}`: {len(problems)} row(s) cannot be used:\n"
            f"{problem_lines(problems)}\nEach row rewords a training row's prompt and keeps its "
            "answer word for word."
        )
    pairs = pairs[:n]
    originals = EvalSet(
        "train", [train.conversations[i] for i, _, _ in pairs], [train.sources[i] for i, _, _ in pairs]
    )
    return originals, EvalSet("rephrased", [r for _, r, _ in pairs], [s for _, _, s in pairs])


def _heldout_set(cfg: Config, n: int) -> EvalSet:
    """Validation conversations (file or split), else the test split."""
    held = load_validation_set(cfg) or load_test_set(cfg)
    held = _with_answers(held)
    return EvalSet("heldout", held.conversations[:n], held.sources[:n])


# ----------------------------------------------------------------------------- the check


def check_memorization(
    cfg: Config, run_dir: Path, n: int = 20, max_new_tokens: int | None = None
) -> dict[str, Any]:
    """Generate for n training prompts, the same reworded, and n held-out prompts; compare.

    Measures how often the replies reproduce the TRAINING responses (verbatim and near-verbatim, see
    `NEAR_VERBATIM`), against the held-out answers measured the same way, and the teacher-forced loss
    of each set; flags memorization when training prompts are reproduced far more often than both
    (`judge_memorization`). Writes memorization.json into the run directory and returns its content.
    """
    started = time.time()
    train = _train_set(cfg)
    if cfg.eval.rephrased:
        train, rephrased = _user_rephrasings(cfg, train, n)
        how, reworded = f"your rewordings in {cfg.eval.rephrased} (eval.rephrased)", "as you reworded them"
    else:
        train = EvalSet("train", train.conversations[:n], train.sources[:n])
        rephrased = EvalSet(
            "rephrased", [_rephrase_conversation(c) for c in train.conversations], train.sources
        )
        how, reworded = PERTURBATION, "lightly rephrased by tunewise"
    sets_in = {"train": train, "rephrased": rephrased, "heldout": _heldout_set(cfg, n)}
    model, tokenizer = load_for_inference(cfg, run_dir)
    if max_new_tokens is None:
        references = [r for s in sets_in.values() for r in s.references]
        max_new_tokens = cfg.eval.max_new_tokens or cap_new_tokens(tokenizer, references)[0]
    outputs, sets = {}, {}
    for name, eval_set in sets_in.items():
        outputs[name] = generate(
            model,
            tokenizer,
            eval_set.conversations,
            max_new_tokens=max_new_tokens,
            batch_size=cfg.eval.batch_size,
        )
        sets[name] = reproduction(outputs[name], eval_set.references)
        loss = summarize_loss(
            example_losses(model, encode_set(eval_set, tokenizer, cfg), tokenizer.pad_token_id)
        )
        sets[name]["loss"] = loss["loss"]
    flagged, message = judge_memorization(sets, reworded)
    result = {
        "flagged": flagged,
        "verdict": "memorized" if flagged else "ok",
        "message": message,
        "threshold": NEAR_VERBATIM,
        "rephrased_by": "user" if cfg.eval.rephrased else "tunewise",
        "rephrasing": how,
        "sets": sets,
        "max_new_tokens": max_new_tokens,
        "seconds": round(time.time() - started, 1),
        "examples": [
            {
                "prompt": prompt_text(c),
                "rephrased": prompt_text(r),
                "reference": reference_of(c),
                "train_output": a,
                "rephrased_output": b,
            }
            for c, r, a, b in list(
                zip(
                    train.conversations,
                    rephrased.conversations,
                    outputs["train"],
                    outputs["rephrased"],
                    strict=True,
                )
            )[:3]
        ],
    }
    write_json(Path(run_dir) / MEMORIZATION, result)
    return result
