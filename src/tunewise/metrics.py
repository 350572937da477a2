"""Generation metrics: one score per (prediction, reference) pair, and which ones a test split gets.

Every metric is a function `(prediction, reference) -> float` in [0, 1]. `choose_metrics` picks them
from the references (`eval.metrics` overrides it); `load_user_metric` loads `eval.metric`, a function
from a file the user names, and nothing else is ever imported. No torch here.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import traceback
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunewise.errors import ConfigError

Metric = Callable[[str, str], float]


def normalize_text(text: str) -> str:
    """Lower case, punctuation (any Unicode punctuation) removed, whitespace collapsed."""
    kept = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text.lower())
    return " ".join(kept.split())


def parse_json(text: str) -> Any:
    """The JSON value of the stripped text, or None when it is not JSON."""
    try:
        return json.loads(text.strip())
    except ValueError:
        return None


def is_json_object(text: str) -> bool:
    return isinstance(parse_json(text), dict)


def first_json_object(text: str) -> dict | None:
    """The first JSON object found anywhere in `text`, or None when there is none."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    return None


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same type, so that age 34 and "34", or 1 and true, differ."""
    return a == b and type(a) is type(b)


def field_accuracy(prediction: str, reference: str) -> float:
    """The fraction of the reference object's fields with an equal value, read leniently from the first
    JSON object in the prediction (0.0 when there is none)."""
    expected = parse_json(reference)
    if not isinstance(expected, dict) or not expected:
        return 0.0
    found = parse_json(prediction)
    found = found if isinstance(found, dict) else first_json_object(prediction)
    if found is None:
        return 0.0
    return sum(key in found and _same(found[key], value) for key, value in expected.items()) / len(expected)


def valid_json(prediction: str, reference: str) -> float:
    """1.0 when the stripped prediction is a JSON object (what the references are), else 0.0."""
    return float(is_json_object(prediction))


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the stripped texts are equal; for a JSON reference, when the prediction parses to an equal
    value whose fields also have the same types (key order and spacing aside)."""
    if prediction.strip() == reference.strip():
        return 1.0
    expected = parse_json(reference)
    if expected is None:
        return 0.0
    parsed = parse_json(prediction)
    if isinstance(expected, dict):
        return float(
            isinstance(parsed, dict) and parsed == expected and field_accuracy(prediction, reference) == 1
        )
    return float(parsed is not None and _same(parsed, expected))


def normalized_match(prediction: str, reference: str) -> float:
    """Exact match after `normalize_text` (case, punctuation and whitespace aside)."""
    return float(normalize_text(prediction) == normalize_text(reference))


class UnicodeWords:
    """rouge-score's tokenizer interface with Unicode words: its default keeps only [a-z0-9]."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"\w+", text.lower())


_ROUGE: list[Any] = []  # the scorer, built once on first use


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (rouge-score, longest common subsequence of words); 1.0 for two empty texts."""
    if not _ROUGE:
        from rouge_score import rouge_scorer

        _ROUGE.append(rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeWords()))
    if not UnicodeWords().tokenize(prediction) and not UnicodeWords().tokenize(reference):
        return 1.0
    return float(_ROUGE[0].score(reference, prediction)["rougeL"].fmeasure)


METRICS: dict[str, Metric] = {
    "exact_match": exact_match,
    "normalized_match": normalized_match,
    "valid_json": valid_json,
    "field_accuracy": field_accuracy,
    "rouge_l": rouge_l,
}
JSON_METRICS = ("valid_json", "field_accuracy")


def choose_metrics(references: list[str], configured: list[str]) -> tuple[list[str], str]:
    """(metric names, why): `eval.metrics` when set, else chosen from the references.

    Always exact and normalized match; JSON objects get JSON validity and per-field accuracy, any other
    text ROUGE-L.

    Raises:
        ConfigError: an unknown name in `eval.metrics`, or JSON metrics for references that are not JSON.
    """
    if configured:
        unknown = [m for m in configured if m not in METRICS]
        if unknown:
            raise ConfigError(
                [
                    f"`eval.metrics`: unknown metric(s) {', '.join(unknown)}; valid: "
                    f"{', '.join(METRICS)} (for your own, set `eval.metric: file.py:function`)"
                ]
            )
        not_json = sum(not is_json_object(r) for r in references)
        if not_json and any(m in JSON_METRICS for m in configured):
            raise ConfigError(
                [
                    f"`eval.metrics`: {', '.join(m for m in configured if m in JSON_METRICS)} "
                    f"score JSON objects, but {not_json} of {len(references)} references are not; "
                    "drop them from `eval.metrics`"
                ]
            )
        return list(dict.fromkeys(configured)), "set by eval.metrics"
    if references and all(is_json_object(r) for r in references):
        return ["exact_match", "normalized_match", *JSON_METRICS], "every reference is a JSON object"
    return ["exact_match", "normalized_match", "rouge_l"], "references are free text"


# ----------------------------------------------------------------------------- the user's metric


@dataclass
class UserMetric:
    """`eval.metric`: a function from the user's file, called with (prediction, reference)."""

    name: str  # the function's name, the key of its scores
    function: Callable[[str, str], Any]
    spec: str  # as written in the config


def load_user_metric(spec: str) -> UserMetric:
    """Import the function named by `eval.metric: path/to/metric.py:function` from that file only.

    Raises:
        ConfigError: the spec is malformed, the file is missing or fails to import, or the function
            is missing or not callable; the message names the file (and line) and the fix.
    """
    path_text, sep, name = spec.rpartition(":")
    if not sep or not path_text or not name.isidentifier():
        raise ConfigError([f"`eval.metric: {spec}`: write it as path/to/metric.py:function_name"])
    path = Path(path_text)
    if not path.is_file():
        raise ConfigError(
            [
                f"`eval.metric: {spec}`: no such file `{path}`; give the path of your .py file "
                "(relative to where you run tunewise)"
            ]
        )
    module_name = f"tunewise_user_metric_{abs(hash(path.resolve()))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError([f"`eval.metric: {spec}`: `{path}` is not a Python file"])
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # the user's code: any error it raises is theirs to fix
        raise ConfigError(
            [
                f"`eval.metric: {spec}`: importing `{path}` failed at {_where(exc, path)}: "
                f"{type(exc).__name__}: {exc}; fix the file"
            ]
        ) from None
    function = getattr(module, name, None)
    if not callable(function):
        found = "is not callable" if function is not None else "is not defined"
        defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ConfigError(
            [
                f"`eval.metric: {spec}`: `{name}` {found} in `{path}` "
                f"(functions there: {', '.join(defined) or 'none'})"
            ]
        )
    return UserMetric(name=name, function=function, spec=spec)


def _where(exc: BaseException, path: Path) -> str:
    """file:line of the deepest frame of the traceback that is in the user's file."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if Path(f.filename) == path.resolve() or f.filename == str(path)
    ]
    if isinstance(exc, SyntaxError) and exc.lineno:
        return f"{path}:{exc.lineno}"
    return f"{path}:{frames[-1].lineno}" if frames else str(path)


# ----------------------------------------------------------------------------- scoring


@dataclass
class Scored:
    """Per-example scores (None where the metric failed) and what failed, per example."""

    scores: list[dict[str, float | None]]
    errors: list[dict[str, str]] = field(default_factory=list)  # one dict per example, empty when none


def call_user_metric(metric: UserMetric, prediction: str, reference: str) -> tuple[float | None, str | None]:
    """(score, None), or (None, what went wrong) when the function raises or returns no number."""
    try:
        value = metric.function(prediction, reference)
    except Exception as exc:  # the user's code: recorded for this example, the evaluation goes on
        return None, f"{type(exc).__name__}: {exc}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        try:
            value = float(value)  # numpy and torch scalars
        except (TypeError, ValueError):
            return None, f"returned {type(value).__name__} {str(value)[:40]!r}, not a number"
    if not math.isfinite(value):
        return None, f"returned {value}, not a finite number"
    return float(value), None


def score_examples(
    predictions: list[str], references: list[str], names: list[str], user: UserMetric | None = None
) -> Scored:
    """Every metric on every (prediction, reference) pair; a failing user metric is recorded, not raised."""
    scored = Scored(scores=[], errors=[])
    for prediction, reference in zip(predictions, references, strict=True):
        row: dict[str, float | None] = {name: METRICS[name](prediction, reference) for name in names}
        errors: dict[str, str] = {}
        if user is not None:
            row[user.name], error = call_user_metric(user, prediction, reference)
            if error:
                errors[user.name] = error
        scored.scores.append(row)
        scored.errors.append(errors)
    return scored


def mean_scores(scores: list[dict[str, float | None]]) -> dict[str, float | None]:
    """The mean of each metric over the examples where it has a value (None when it has none)."""
    names = list(dict.fromkeys(k for row in scores for k in row))
    out: dict[str, float | None] = {}
    for name in names:
        values = [row[name] for row in scores if row.get(name) is not None]
        out[name] = sum(values) / len(values) if values else None
    return out


# ----------------------------------------------------------------------------- base vs tuned, per example

PRIMARY_ORDER = ("field_accuracy", "rouge_l", "normalized_match", "exact_match", "valid_json")


def primary_metric(names: list[str], user: str | None = None) -> str:
    """The metric that ranks regressions and gains: the user's, else the most graded one in use."""
    if user:
        return user
    return next((m for m in PRIMARY_ORDER if m in names), names[0])


def rank_changes(records: list[dict[str, Any]], k: int) -> tuple[list[dict], list[dict]]:
    """(worst regressions, best gains): eval.jsonl records by `change` (tuned - base on the primary
    metric); equal changes are ordered by how much the example's loss rose or fell."""

    def loss_change(record: dict) -> float:
        loss = record.get("loss") or {}
        b, t = loss.get("base"), loss.get("tuned")
        return t - b if isinstance(b, int | float) and isinstance(t, int | float) else 0.0

    scored = [r for r in records if isinstance(r.get("change"), int | float)]
    regressions = sorted((r for r in scored if r["change"] < 0), key=lambda r: (r["change"], -loss_change(r)))
    gains = sorted((r for r in scored if r["change"] > 0), key=lambda r: (-r["change"], loss_change(r)))
    return regressions[:k], gains[:k]
