"""Findings: what the doctor saw at a step, with evidence in numbers, ranked causes and ranked fixes.

A `Finding` is printed as it happens, appended to findings.jsonl (one JSON object per line) and
summarised at the end of a run; each `Fix` is a config override when one exists.

Whose words a fix is in. The rules write every fix as a tunewise override (`training.learning_rate=
2.0e-05`, `model.precision=fp32`, `adapter.r=4`): what a `tunewise train` user applies. Someone who runs
their own Trainer script (watched with `tunewise.watch`, or a plain Trainer output_dir read by `tunewise
doctor`) has no tunewise config and needs the same change as a TrainingArguments argument
(`learning_rate=2.0e-05`, `bf16=False`), a `LoraConfig(...)` argument, or advice where a script has no
such setting. `run_vocabulary` tells which a run directory needs; `speak_fix` and `speak_finding`
rewrite a fix; the live monitor of `tunewise.watch` and the doctor's rendering both use them.
"""

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

from tunewise import rundir
from tunewise.errors import DoctorError

Severity = Literal["info", "warning", "error"]
SEVERITY_RANK = {"info": 0, "warning": 1, "error": 2}


@dataclass
class Fix:
    """One remedy: a `section.key=value` override when a config change exists, and why it helps."""

    change: str | None
    why: str


@dataclass
class Finding:
    """Something the doctor saw at a step: evidence in numbers, ranked causes, ranked fixes."""

    step: int | None
    severity: Severity
    code: str
    title: str
    evidence: dict[str, Any] = field(default_factory=dict)
    causes: list[str] = field(default_factory=list)
    fixes: list[Fix] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "severity": self.severity,
            "code": self.code,
            "title": self.title,
            "evidence": self.evidence,
            "causes": self.causes,
            "fixes": [{"change": f.change, "why": f.why} for f in self.fixes],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        fixes = [Fix(f.get("change"), f.get("why", "")) for f in data.get("fixes") or []]
        return cls(
            data.get("step"),
            data["severity"],
            data["code"],
            data["title"],
            dict(data.get("evidence") or {}),
            list(data.get("causes") or []),
            fixes,
        )


Advice = tuple[list[str], list[Fix]]


def num(x: float | None) -> str:
    """A loss-like number for people: three significant digits, NaN and inf spelled out."""
    if x is None:
        return "n/a"
    if not math.isfinite(x):
        return "NaN" if math.isnan(x) else "inf" if x > 0 else "-inf"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def fmt_lr(x: float | None) -> str:
    """A learning rate as `2.0e-05`: always with a dot, since PyYAML reads `2e-05` as a string."""
    return "n/a" if x is None else f"{x:.1e}"


def rank_advice(items: list[tuple[float, str, Fix]]) -> Advice:
    """Sort (score, cause, fix) by score, keeping the default order among equals."""
    ordered = sorted(items, key=lambda item: -item[0])
    return [cause for _, cause, _ in ordered], [fix for _, _, fix in ordered]


def append_findings(path: Path, findings: list[Finding]) -> None:
    """Append findings to a findings.jsonl file, one JSON object per line (NaN stays NaN)."""
    rundir.append_jsonl(path, [finding.to_dict() for finding in findings])


def read_findings(path: Path) -> list[Finding]:
    """Read findings.jsonl; a missing file means no findings yet."""
    findings = []
    for lineno, record in rundir.read_jsonl(path, strict=True):
        try:
            findings.append(Finding.from_dict(record))
        except KeyError as exc:
            raise DoctorError(
                f"{path}:{lineno}: finding has no {exc}; expected severity, code and title"
            ) from None
    return findings


# ----------------------------------------------------------------------------- whose words a fix is in

Vocabulary = Literal["tunewise", "trainer"]
WATCH_SOURCE = "tunewise.watch"  # the `source` that watch writes in config.yaml, plan.json and result.json

# tunewise settings a Trainer script spells otherwise; training.<field> is TrainingArguments' <field>.
SCRIPT_NAMES = {
    "adapter.r": "LoraConfig(r={})",
    "adapter.alpha": "LoraConfig(lora_alpha={})",
    "adapter.dropout": "LoraConfig(lora_dropout={})",
    "data.max_seq_length": "max_length={}",  # TRL's SFTConfig; the tokenizer's truncation for a plain Trainer
}
# model.precision=<value> as TrainingArguments' mixed-precision switches.
SCRIPT_PRECISION = {
    "bf16": "bf16=True",
    "fp16": "fp16=True",
    "fp32": "bf16=False fp16=False",
}
SCRIPT_FIXES = {  # tunewise settings that a Trainer script has no argument for, as advice
    "data.train_on": Fix(
        None,
        "check which tokens the data collator gives a label (`labels` other than -100; with TRL: "
        "`completion_only_loss`, `assistant_only_loss` and the chat template)",
    ),
    "data.too_long": Fix(
        None,
        "the prompt fills the sequence: raise `max_length` (SFTConfig) or drop "
        "the examples whose response does not fit",
    ),
    "model.method": Fix(
        "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4')",
        "load the base model in 4 bits (QLoRA): pass it as `quantization_config` to from_pretrained",
    ),
}


def run_vocabulary(config: Mapping[str, Any] | None, plan: Mapping[str, Any] | None) -> Vocabulary:
    """The words a run directory's user applies fixes in, from its config.yaml and plan.json.

    "tunewise" only for a run that `tunewise train` wrote (a config.yaml that is not watch's): its user
    has a tunewise config. Everything else is "trainer": a run `tunewise.watch` wrote (`source:
    tunewise.watch`), and any log tunewise did not write (a Trainer output_dir, TensorBoard events,
    LLaMA-Factory, Axolotl), whose user has a script or a tool config whose training keys are
    TrainingArguments' names, never a tunewise config.
    """
    watched = any(isinstance(doc, Mapping) and doc.get("source") == WATCH_SOURCE for doc in (config, plan))
    return "trainer" if watched or not config else "tunewise"


def speak_fix(fix: Fix, vocabulary: Vocabulary = "trainer") -> Fix:
    """A fix in `vocabulary`'s words: `training.learning_rate=1e-05` -> `learning_rate=1e-05` for a
    script; a change of several settings (space-separated) is rewritten setting by setting."""
    if vocabulary == "tunewise" or not fix.change or "=" not in fix.change:
        return fix
    parts = fix.change.split()
    advice = [SCRIPT_FIXES[name] for name in (p.split("=", 1)[0] for p in parts) if name in SCRIPT_FIXES]
    if len(parts) == 1 and advice:
        return advice[0]
    return Fix(" ".join(_script_setting(p) for p in parts), fix.why)


def _script_setting(change: str) -> str:
    """One `section.key=value` as a script writes it (unknown names are kept as they are)."""
    if "=" not in change:
        return change
    name, value = change.split("=", 1)
    if name.startswith("training."):
        value = {"true": "True", "false": "False"}.get(value, value)  # Python, not YAML
        return f"{name.removeprefix('training.')}={value}"
    if name == "model.precision":
        return SCRIPT_PRECISION.get(value, change)
    if name in SCRIPT_NAMES:
        return SCRIPT_NAMES[name].format(value)
    return change


def speak_finding(finding: Finding, vocabulary: Vocabulary = "trainer") -> Finding:
    """A copy of the finding with every fix in `vocabulary`'s words (the original is left as it is)."""
    return dataclasses.replace(finding, fixes=[speak_fix(f, vocabulary) for f in finding.fixes])
