"""Every threshold in the doctor's catalogue is pinned: a fixture just past it and one just short of it.

The cases live in tests/fixtures/doctor_boundaries/boundaries.json (written by make_boundaries.py, which
says for each case which threshold it sits next to and why). scripts/mutate_doctor.py halves and doubles
each threshold and checks that these tests (with the other doctor tests) then fail.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tunewise.doctor.codes import CODES, THRESHOLDS
from tunewise.doctor.curve import Curve, EvalPoint, TrainPoint
from tunewise.doctor.diagnose import diagnose_curve
from tunewise.doctor.findings import Finding
from tunewise.doctor.memory import check_memory
from tunewise.doctor.watcher import WATCHER_KEYS, CurveWatcher

BOUNDARIES = Path(__file__).parents[1] / "fixtures" / "doctor_boundaries" / "boundaries.json"
CASES = json.loads(BOUNDARIES.read_text())
GIB = 1 << 30


def curve_of(case: dict) -> Curve:
    train = [
        TrainPoint(s, loss, grad, lr, epoch, tokens) for s, loss, grad, lr, epoch, tokens in case["train"]
    ]
    return Curve(train, [EvalPoint(s, x) for s, x in case["eval"]], case["name"])


def live_findings(case: dict) -> list[Finding]:
    """The findings a live monitor reports: each point fed as it comes, then the end-of-run checks."""
    watcher = CurveWatcher(**{k: case["context"].get(k) for k in WATCHER_KEYS})
    curve = curve_of(case)
    for p in sorted([*curve.train, *curve.eval], key=lambda p: (p.step, isinstance(p, EvalPoint))):
        if isinstance(p, TrainPoint):
            watcher.observe_train(p.step, p.loss, p.grad_norm, p.lr, p.epoch, p.trainable_tokens)
        else:
            watcher.observe_eval(p.step, p.eval_loss, p.epoch)
    watcher.finish()
    return watcher.findings


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_boundary_case(case: dict) -> None:
    if case["mode"] == "live":
        findings = live_findings(case)
    else:
        diagnosis = diagnose_curve(curve_of(case), case["context"])
        findings = diagnosis.findings
        if case["verdict"]:
            assert diagnosis.verdict == case["verdict"], (diagnosis.summary, _seen(findings))
    for code, step, severity in case["has"]:
        match = [f for f in findings if f.code == code and step in (None, f.step)]
        assert match, f"expected {code} at step {step}; found {_seen(findings)}"
        if severity:
            assert match[0].severity == severity, _seen(findings)
    for code, step in case["lacks"]:
        assert not [f for f in findings if f.code == code and step in (None, f.step)], _seen(findings)


def _seen(findings: list[Finding]) -> list[tuple]:
    return [(f.step, f.code, f.severity) for f in findings]


def test_memory_high_at_step_1() -> None:
    (finding,) = check_memory(int(0.95 * 8 * GIB), 8 * GIB)
    assert finding.code == "memory_high" and finding.step == 1 and finding.severity == "warning"
    assert finding.evidence == {"memory_bytes": int(0.95 * 8 * GIB), "device_bytes": 8 * GIB}
    assert "95%" in finding.title and finding.causes
    assert check_memory(int(0.6 * 8 * GIB), 8 * GIB) == []
    assert check_memory(5 * GIB, 0) == []  # device memory unknown: nothing to compare with


def test_every_catalogued_threshold_has_a_case_on_each_side() -> None:
    pinned = {name for case in CASES for name in case["pins"]} | {"MEMORY_HIGH"}
    catalogued = {name for names in THRESHOLDS.values() for name in names}
    assert catalogued == pinned
    for name in catalogued - {"MEMORY_HIGH"}:
        sides = [c for c in CASES if name in c["pins"]]
        # a case on each side, or (a count of points) one finding whose step moves with the threshold
        assert len(sides) >= 2 or any(step is not None for c in sides for _, step, _ in c["has"]), name


def test_every_catalogued_code_is_raised_by_some_fixture() -> None:
    raised = {code for case in CASES for code, _, _ in case["has"]} | {"memory_high"}
    # Codes raised by other fixtures: recovery by the live recover test; insufficient_data by a verdict.
    elsewhere = {"recovery", "insufficient_data"}
    assert set(CODES) - elsewhere <= raised, set(CODES) - elsewhere - raised


def test_thresholds_are_plain_numbers_in_their_modules() -> None:
    import importlib

    for module_name, names in THRESHOLDS.items():
        module = importlib.import_module(module_name)
        for name in names:
            value = getattr(module, name)
            assert isinstance(value, int | float) and math.isfinite(value) and value > 0, (module_name, name)
