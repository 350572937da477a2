"""Findings: what the doctor saw at a step, with evidence in numbers, ranked causes and ranked fixes.

A `Finding` is printed as it happens, appended to findings.jsonl (one JSON object per line) and
summarised at the end of a run; each `Fix` is a config override when one exists.
"""

import math
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
