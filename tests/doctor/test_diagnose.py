"""The doctor: rules on synthetic curves, verdicts on Trainer-shaped fixtures, every log format it reads."""

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tunewise.doctor.curve import Curve, TrainPoint, load_curve
from tunewise.doctor.diagnose import Diagnosis, diagnose_curve, diagnose_path, render_diagnosis
from tunewise.doctor.findings import Finding, Fix, append_findings, read_findings
from tunewise.doctor.watcher import CurveWatcher
from tunewise.errors import DoctorError

FIXTURES = Path(__file__).parents[1] / "fixtures"
STATES = FIXTURES / "trainer_states"
EXPECTED = json.loads((FIXTURES / "expected_verdicts.json").read_text())

DIVERGENCE_FIXES = ["training.learning_rate=", "training.max_grad_norm=0.3", "training.warmup_steps=", None]
OVERFIT_FIXES = [
    None,
    "training.num_train_epochs=",
    "adapter.dropout=0.1",
    "adapter.r=4",
    "training.weight_decay=0.01",
]
# fixture -> (finding codes that must be there, code whose fixes are checked, expected fix order)
SHAPES = {
    "healthy_lora": (set(), None, None),
    "nan_loss": ({"non_finite"}, "non_finite", DIVERGENCE_FIXES),
    # a NaN hidden as 0.0 adds half precision and the logging filter to the divergence fixes
    "nan_hidden_by_filter": (
        {"non_finite"},
        "non_finite",
        [*DIVERGENCE_FIXES, "training.bf16=true", "training.logging_nan_inf_filter=false"],
    ),
    # 2.05 -> 9.6 in the first steps is an explosion at once (4.7x the start), no spike warning first
    "early_explosion": ({"loss_explosion"}, "loss_explosion", DIVERGENCE_FIXES),
    "spike_recovers": ({"loss_spike", "grad_norm_spike"}, "loss_spike", DIVERGENCE_FIXES),
    "flat_lora_lr2e-5": (
        {"not_falling", "flat"},
        "flat",
        ["data.train_on=assistant", "training.learning_rate=2.0e-04", None],
    ),
    "flat_full_lr1e-6": (
        {"flat"},
        "flat",
        ["training.learning_rate=1.0e-05", "data.train_on=assistant", None],
    ),
    "flat_no_grad": ({"flat"}, "flat", [None, "data.train_on=assistant", "training.learning_rate=2.0e-03"]),
    "overfit_small_data": ({"overfitting", "epoch_drop"}, "overfitting", OVERFIT_FIXES),
    "resumed_healthy": (set(), None, None),
    "short_run": ({"insufficient_data"}, None, None),
    "seq2seq_healthy": (set(), None, None),
    "classification_healthy": (set(), None, None),
    "classification_overfit": ({"overfitting", "memorization"}, "overfitting", OVERFIT_FIXES),
    "no_eval_healthy": (set(), None, None),
}


def changes(finding: Finding) -> list[str | None]:
    return [fix.change for fix in finding.fixes]


def assert_fix_order(finding: Finding, expected: list[str | None]) -> None:
    got = changes(finding)
    assert len(got) == len(expected), got
    for change, want in zip(got, expected, strict=True):
        assert change == want if want is None or not want.endswith("=") else change.startswith(want), got


# ----------------------------------------------------------------------------- fixtures


def test_every_fixture_has_an_expected_verdict() -> None:
    assert len(EXPECTED) >= 12
    assert {p.stem for p in STATES.glob("*.json")} == set(EXPECTED) == set(SHAPES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_verdict_codes_and_fix_order(name: str) -> None:
    d = diagnose_path(STATES / f"{name}.json")
    assert d.verdict == EXPECTED[name], d.summary
    codes, code, fixes = SHAPES[name]
    assert codes <= {f.code for f in d.findings}
    if EXPECTED[name] == "healthy":
        assert d.findings == [] and d.exit_code() == 0
    if code:
        assert_fix_order(next(f for f in d.findings if f.code == code), fixes)
    assert any(ch.isdigit() for ch in d.summary)


def test_nan_hidden_by_logging_filter_is_reported_as_nan() -> None:
    d = diagnose_path(STATES / "nan_hidden_by_filter.json")
    finding = next(f for f in d.findings if f.code == "non_finite")
    assert finding.step == 60 and finding.evidence["nan_hidden_by_logging_filter"] is True
    assert "logging_nan_inf_filter" in finding.title and "NaN" in finding.title
    assert math.isnan(d.evidence["loss_last"])


def test_nan_fixture_cites_numbers_and_keeps_the_checkpoint_before_divergence() -> None:
    d = diagnose_path(STATES / "nan_loss.json")
    finding = d.findings[0]
    assert finding.title.startswith("loss went from 1.76 at step 40 to NaN at step 45; lr ")
    assert finding.evidence["last_finite_loss"] == pytest.approx(1.7622)
    assert changes(finding)[0] == "training.learning_rate=5.0e-04"  # a tenth of the peak 5e-3
    assert d.best_checkpoint == "checkpoint-25" and d.exit_code() == 2


def test_overfit_best_checkpoint_is_the_best_eval() -> None:
    d = diagnose_path(STATES / "overfit_small_data.json")
    assert d.best_checkpoint == "checkpoint-80"
    overfit = next(f for f in d.findings if f.code == "overfitting")
    assert overfit.evidence["best_eval_step"] == 80
    assert overfit.evidence["best_eval_loss"] == pytest.approx(1.62, 0.01)
    assert d.exit_code() == 1


def test_resumed_run_keeps_the_last_occurrence_of_each_step() -> None:
    curve = load_curve(STATES / "resumed_healthy.json")
    steps = [p.step for p in curve.train]
    assert steps == sorted(set(steps)) and steps[-1] == 300
    assert all(math.isfinite(p.loss) for p in curve.train)  # the NaN at step 150 was re-run


def test_flat_lora_context_ranks_learning_rate_first() -> None:
    curve = load_curve(STATES / "flat_lora_lr2e-5.json")
    d = diagnose_curve(curve, {"method": "lora", "learning_rate": 2e-5})
    flat = next(f for f in d.findings if f.code == "flat")
    assert "a LoRA run at a full-fine-tuning rate" in flat.causes[0]
    assert changes(flat) == ["training.learning_rate=2.0e-04", "data.train_on=assistant", None]


def test_eval_metrics_other_than_loss_are_kept() -> None:
    curve = load_curve(STATES / "classification_healthy.json")
    assert "eval_accuracy" in curve.eval[0].metrics
    assert "eval_bleu" in load_curve(STATES / "seq2seq_healthy.json").eval[-1].metrics


# ----------------------------------------------------------------------------- CurveWatcher


def feed(
    watcher: CurveWatcher,
    losses: list[float],
    grads: list[float] | None = None,
    lr: float = 2e-4,
    start: int = 1,
    **kwargs: object,
) -> dict[int, list[Finding]]:
    """Feed losses one step at a time; returns the new findings per step."""
    out = {}
    for i, loss in enumerate(losses):
        grad = grads[i] if grads else 0.5
        out[start + i] = watcher.observe_train(start + i, loss, grad, lr, None, **kwargs)
    return out


def falling(n: int, start: float = 2.3, floor: float = 1.0, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [floor + (start - floor) * math.exp(-i / 40) + rng.gauss(0, 0.03) for i in range(n)]


def flat_curve(n: int, level: float = 2.3, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [level + rng.gauss(0, 0.02) for _ in range(n)]


def curve_of(losses: list[float], grads: list[float] | None = None, lr: float = 2e-4) -> Curve:
    return Curve([TrainPoint(i + 1, x, grads[i] if grads else 0.5, lr) for i, x in enumerate(losses)], [])


def test_watcher_healthy_curve_raises_nothing() -> None:
    watcher = CurveWatcher(method="lora", learning_rate=2e-4, max_grad_norm=0.3)
    assert all(f == [] for f in feed(watcher, falling(200)).values())
    assert watcher.finish() == [] and diagnose_curve(curve_of(falling(200))).verdict == "healthy"


def test_watcher_noisy_per_step_losses_raise_nothing() -> None:
    # Live, every optimizer step: batch-to-batch noise of 10% must not look like spikes or a flat loss.
    rng = random.Random(3)
    losses = [(1.0 + 1.2 * math.exp(-s / 80)) * math.exp(rng.gauss(0, 0.1)) for s in range(600)]
    watcher = CurveWatcher(method="lora", learning_rate=2e-4, warmup_steps=18, total_steps=600)
    assert all(f == [] for f in feed(watcher, losses).values()) and watcher.finish() == []


def test_watcher_fires_at_the_first_non_finite_step_and_does_not_spam() -> None:
    watcher = CurveWatcher(method="lora", learning_rate=5e-2)
    losses = falling(20)[:6] + [math.nan] * 10
    found = feed(watcher, losses, lr=5e-2)
    assert [f.code for f in found[7]] == ["non_finite"] and all(found[s] == [] for s in range(8, 17))
    finding = found[7][0]
    assert finding.severity == "error" and finding.evidence["step"] == 7
    assert finding.title == f"loss went from {losses[5]:.3g} at step 6 to NaN at step 7; lr 5.0e-02"
    assert changes(finding)[:2] == ["training.learning_rate=5.0e-03", "training.max_grad_norm=0.3"]


def test_watcher_non_finite_grad_norm_and_hidden_nan() -> None:
    watcher = CurveWatcher()
    feed(watcher, falling(5))
    (finding,) = watcher.observe_train(6, 0.0, math.nan, 1e-4, 0.1)
    assert finding.code == "non_finite" and finding.evidence["nan_hidden_by_logging_filter"]
    assert math.isnan(finding.evidence["loss"])
    watcher = CurveWatcher()
    feed(watcher, falling(5))
    (finding,) = watcher.observe_train(6, 1.9, math.inf, 1e-4, 0.1)
    assert finding.title.startswith("grad_norm is inf at step 6")


def test_watcher_ranks_clipping_first_when_there_is_none() -> None:
    watcher = CurveWatcher(method="lora", learning_rate=2e-4, max_grad_norm=0.0)
    feed(watcher, falling(5))
    (finding,) = watcher.observe_train(6, math.nan, math.nan, 2e-4, None)
    assert finding.causes[0].startswith("max_grad_norm is 0 (no clipping)")
    assert changes(finding)[0] == "training.max_grad_norm=0.3"


def test_watcher_zero_trainable_tokens_ranks_masking_first() -> None:
    watcher = CurveWatcher(method="lora", learning_rate=2e-4)
    found = feed(watcher, flat_curve(10), trainable_tokens=0)
    (finding,) = found[10]
    assert finding.code == "not_falling" and finding.evidence["trainable_tokens"] == 0
    assert changes(finding)[0] == "data.train_on=assistant" and "trainable_tokens is 0" in finding.causes[0]


def test_watcher_flat_escalates_once_per_severity() -> None:
    watcher = CurveWatcher(method="lora", learning_rate=2e-5)
    found = feed(watcher, flat_curve(150), lr=2e-5)
    fired = [(step, f.code, f.severity) for step, fs in found.items() for f in fs]
    assert fired == [(10, "not_falling", "warning"), (50, "flat", "warning"), (100, "flat", "error")]
    assert "a LoRA run at a full-fine-tuning rate" in found[10][0].causes[0]
    assert diagnose_curve(curve_of(flat_curve(150), lr=2e-5)).verdict == "flat"


def test_watcher_not_falling_respects_noise() -> None:
    watcher = CurveWatcher()
    # 4% drop over 10 steps: more than 1% and more than the noise of the first points
    found = feed(watcher, [2.30, 2.31, 2.29, 2.28, 2.26, 2.25, 2.24, 2.22, 2.21, 2.20])
    assert found[10] == []


def test_watcher_no_gradient_ranks_adapter_first() -> None:
    watcher = CurveWatcher(method="qlora", learning_rate=2e-4)
    (finding,) = feed(watcher, flat_curve(10), grads=[0.0] * 10)[10]
    assert changes(finding)[0] is None and "enable_input_require_grads" in finding.fixes[0].why


def test_watcher_spike_that_recovers_is_unstable() -> None:
    losses = falling(120)
    losses[60:63] = [5.0, 4.0, losses[59]]
    watcher = CurveWatcher()
    found = feed(watcher, losses)
    assert [f.code for f in found[61]] == ["loss_spike"] and found[62] == []
    assert watcher.recovered and watcher.recovered[0][:2] == ("loss_spike", 61)
    d = diagnose_curve(curve_of(losses))
    assert d.verdict == "unstable" and d.exit_code() == 1


def test_watcher_spike_that_stays_is_an_explosion() -> None:
    losses = falling(30) + [4.0] * 20
    found = feed(CurveWatcher(), losses)
    fired = [(s, f.code, f.severity) for s, fs in found.items() for f in fs]
    assert fired == [(31, "loss_spike", "warning"), (40, "loss_explosion", "error")]
    assert diagnose_curve(curve_of(losses)).verdict == "diverged"


def test_watcher_grad_norm_spike() -> None:
    grads = [0.5] * 40
    grads[30] = 12.0
    found = feed(CurveWatcher(), falling(40), grads=grads)
    (finding,) = found[31]
    assert finding.code == "grad_norm_spike" and finding.evidence["ratio"] == pytest.approx(24)


def test_watcher_overfitting_on_rising_eval() -> None:
    watcher = CurveWatcher(method="lora")
    losses = falling(200, floor=0.5)
    found = []
    evals = {40: 1.5, 80: 1.3, 120: 1.35, 160: 1.45, 200: 1.6}
    for step in range(1, 201):
        watcher.observe_train(step, losses[step - 1], 0.5, 2e-4, step / 50)
        if step % 40 == 0:
            found += watcher.observe_eval(step, evals[step], step / 50)
    codes = [f.code for f in found]
    assert codes.count("overfitting") == 1
    overfit = next(f for f in found if f.code == "overfitting")
    assert overfit.step == 160 and overfit.evidence["best_eval_step"] == 80
    assert_fix_order(overfit, OVERFIT_FIXES)


def test_watcher_memorization_and_full_fine_tuning_drops_adapter_fixes() -> None:
    watcher = CurveWatcher(method="full")
    feed(watcher, [0.02 + 0.6 * math.exp(-i / 5) for i in range(30)])
    found = watcher.observe_eval(30, 1.4, 1.0)
    memo = next(f for f in found if f.code == "memorization")
    assert not any((c or "").startswith("adapter.") for c in changes(memo))


def test_watcher_epoch_drop() -> None:
    watcher = CurveWatcher(steps_per_epoch=10)
    losses = [2.0 - 0.005 * i for i in range(10)] + [1.5 - 0.005 * i for i in range(10)]
    found = [f for step, x in enumerate(losses, 1) for f in watcher.observe_train(step, x, 0.5, 1e-4, None)]
    assert [f.code for f in found] == ["epoch_drop"] and found[0].evidence["epoch"] == 2


def test_short_curves_are_insufficient_data_unless_they_diverge() -> None:
    assert diagnose_curve(curve_of([2.3, 2.2, 2.1])).verdict == "insufficient-data"
    assert diagnose_curve(curve_of([2.3, 2.2, math.nan])).verdict == "diverged"


# ----------------------------------------------------------------------------- log formats


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_run_dir_with_metrics_jsonl_config_and_result(tmp_path: Path) -> None:
    records = [
        {
            "type": "train",
            "step": s,
            "epoch": s / 100,
            "loss": 2.3 - 0.05 * s,
            "grad_norm": 0.8,
            "learning_rate": 5e-2,
            "tokens": 1024,
            "trained_tokens": 400,
            "tokens_per_s": 500.0,
            "time": s,
        }
        for s in range(1, 7)
    ]
    records.insert(3, {"type": "eval", "step": 3, "epoch": 0.03, "eval_loss": 2.4})
    records.append(
        {
            "type": "train",
            "step": 7,
            "epoch": 0.07,
            "loss": math.nan,
            "grad_norm": math.inf,
            "learning_rate": 5e-2,
            "tokens": 1024,
            "tokens_per_s": 500.0,
            "time": 7,
        }
    )
    write_jsonl(tmp_path / "metrics.jsonl", records)
    assert "NaN" in (tmp_path / "metrics.jsonl").read_text()
    (tmp_path / "config.yaml").write_text(
        "model:\n  method: lora\ntraining:\n  learning_rate: 5.0e-2\n"
        "  max_grad_norm: 0\n  warmup_steps: 0\n  max_steps: 2000\n"
    )
    (tmp_path / "result.json").write_text(json.dumps({"status": "diverged", "diverged_at": 7}))
    for step in (3, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
    d = diagnose_path(tmp_path)
    assert d.verdict == "diverged" and d.evidence["status"] == "diverged"
    finding = next(f for f in d.findings if f.code == "non_finite")
    assert finding.title == "loss went from 2 at step 6 to NaN at step 7; lr 5.0e-02"
    # facts from config.yaml: lr far too high for LoRA, no clipping, no warmup (10% of 2000 = 200)
    assert changes(finding) == [
        "training.learning_rate=5.0e-03",
        "training.max_grad_norm=0.3",
        "training.warmup_steps=200",
        None,
    ]
    assert d.best_checkpoint == "checkpoint-3"  # the only eval; checkpoint-6 has no eval to vouch for it
    text = render_diagnosis(d)
    for part in (
        "verdict: DIVERGED",
        "training.learning_rate=5.0e-03",
        "checkpoint to keep: checkpoint-3",
        "findings over time:",
        "step 7",
    ):
        assert part in text
    assert "\033[" not in text and "\033[" in render_diagnosis(d, color=True)


def test_run_dir_without_eval_keeps_the_last_checkpoint_before_divergence(tmp_path: Path) -> None:
    losses = [*falling(12), math.nan]
    write_jsonl(
        tmp_path / "metrics.jsonl",
        [
            {"type": "train", "step": i + 1, "loss": x, "grad_norm": 0.5, "learning_rate": 1e-3}
            for i, x in enumerate(losses)
        ],
    )
    for step in (5, 10, 13):
        (tmp_path / f"checkpoint-{step}").mkdir()
    assert diagnose_path(tmp_path).best_checkpoint == "checkpoint-10"


def test_resume_in_metrics_jsonl_drops_the_abandoned_attempt(tmp_path: Path) -> None:
    # tunewise's recovery: diverged at step 8, resumed from checkpoint-5 with a lower rate, stopped at 7.
    first = [{"type": "train", "step": s, "loss": 2.0 - 0.05 * s, "grad_norm": 0.5} for s in range(1, 8)]
    first.append({"type": "train", "step": 8, "loss": math.nan, "grad_norm": math.nan})
    again = [{"type": "train", "step": s, "loss": 1.7 - 0.05 * s, "grad_norm": 0.4} for s in (6, 7)]
    first.insert(6, {"type": "eval", "step": 6, "eval_loss": 9.0})
    write_jsonl(tmp_path / "metrics.jsonl", first + again)
    curve = load_curve(tmp_path)
    assert [p.step for p in curve.train] == [1, 2, 3, 4, 5, 6, 7] and curve.eval == []
    assert curve.train[-1].loss == pytest.approx(1.35)
    assert diagnose_path(tmp_path).verdict == "healthy"


def test_plan_json_gives_warmup_and_total_steps(tmp_path: Path) -> None:
    write_jsonl(
        tmp_path / "metrics.jsonl",
        [
            {"type": "train", "step": s, "loss": x, "grad_norm": 0.5, "learning_rate": 2e-4}
            for s, x in enumerate([2.3, 2.2, 2.1, math.nan], 1)
        ],
    )
    (tmp_path / "config.yaml").write_text("model: {method: qlora}\ntraining: {warmup_steps: 0.03}\n")
    (tmp_path / "plan.json").write_text(
        json.dumps({"warmup_steps": 6, "steps": {"total_steps": 189, "steps_per_epoch": 63}})
    )
    finding = diagnose_path(tmp_path).findings[0]
    # 0.03 is a fraction of all steps, not "no warmup"; plan.json has the count; 10% of 189 < 100 < 189/2
    assert "too little warmup (6 steps)" in finding.causes
    assert "training.warmup_steps=94" in changes(finding)


def test_trainer_output_dir_reads_the_newest_checkpoint(tmp_path: Path) -> None:
    full = json.loads((STATES / "healthy_lora.json").read_text())
    for step in (100, 200, 300):
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        history = [h for h in full["log_history"] if h.get("step", 0) <= step and "train_runtime" not in h]
        state = {**full, "log_history": history, "global_step": step}
        (ckpt / "trainer_state.json").write_text(json.dumps(state))
    curve = load_curve(tmp_path)
    assert curve.train[-1].step == 300 and curve.checkpoints == [100, 200, 300]
    d = diagnose_path(tmp_path)
    assert d.verdict == "healthy" and d.best_checkpoint == "checkpoint-300"


def test_tensorboard_event_files(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    logdir = tmp_path / "runs" / "Nov25_12-00-00_host"
    writer = SummaryWriter(str(logdir))
    for step, loss in enumerate([*falling(8), math.nan, math.nan], 1):
        writer.add_scalar("train/loss", loss, step)
        writer.add_scalar("train/grad_norm", 0.5 if math.isfinite(loss) else math.nan, step)
        writer.add_scalar("train/learning_rate", 1e-3, step)
        writer.add_scalar("train/epoch", step / 10, step)
    writer.add_scalar("eval/loss", 2.1, 5)
    writer.close()
    curve = load_curve(tmp_path)  # found nested, as Trainer writes them
    assert [p.step for p in curve.train] == list(range(1, 11))
    assert curve.eval[0].eval_loss == pytest.approx(2.1)
    d = diagnose_path(tmp_path)
    assert d.verdict == "diverged" and d.findings[0].step == 9 and d.best_checkpoint == "checkpoint-5"


def test_corrupt_metrics_jsonl_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"type": "train", "step": 1, "loss": 2.3}\n{"type": "train", "step": 2, "loss": \n'
        '{"type": "train", "step": 3, "loss": 2.1}\n'
    )
    with pytest.raises(DoctorError, match=rf"{path}:2: not valid JSON"):
        load_curve(tmp_path)


def test_cut_off_last_line_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    write_jsonl(path, [{"type": "train", "step": s, "loss": 2.0} for s in (1, 2)])
    path.write_text(path.read_text() + '{"type": "train", "st')
    assert [p.step for p in load_curve(path).train] == [1, 2]


def test_corrupt_trainer_state_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "trainer_state.json"
    path.write_text('{\n  "log_history": [\n    {"loss": 2.3, "step": 1},,\n  ]\n}\n')
    with pytest.raises(DoctorError, match=rf"{path}:3: not valid JSON"):
        load_curve(path)


def test_nothing_readable_raises(tmp_path: Path) -> None:
    with pytest.raises(DoctorError, match="found no logs; expected a tunewise run directory"):
        load_curve(tmp_path)
    with pytest.raises(DoctorError, match="no such file"):
        load_curve(tmp_path / "missing")
    (tmp_path / "trainer_state.json").write_text('{"log_history": []}')
    with pytest.raises(DoctorError, match="no train loss or eval loss"):
        load_curve(tmp_path)


# ----------------------------------------------------------------------------- findings.jsonl, API


def test_findings_jsonl_round_trip(tmp_path: Path) -> None:
    finding = Finding(
        7,
        "error",
        "non_finite",
        "loss went to NaN",
        {"loss": math.nan, "step": 7},
        ["learning rate too high"],
        [Fix("training.learning_rate=5.0e-03", "smaller"), Fix(None, "x")],
    )
    path = tmp_path / "findings.jsonl"
    append_findings(path, [finding])
    append_findings(path, [finding])
    back = read_findings(path)
    assert len(back) == 2 and back[0].fixes == finding.fixes and math.isnan(back[0].evidence["loss"])
    assert back[0].to_dict()["fixes"] == [
        {"change": "training.learning_rate=5.0e-03", "why": "smaller"},
        {"change": None, "why": "x"},
    ]
    assert read_findings(tmp_path / "none.jsonl") == []


def test_diagnosis_exit_codes_and_dict() -> None:
    info = Finding(1, "info", "x", "t")
    warn = Finding(2, "warning", "y", "t")
    assert Diagnosis("healthy", "s", [], {}, None, "src").exit_code() == 0
    assert Diagnosis("healthy", "s", [info], {}, None, "src").exit_code() == 0
    d = Diagnosis("unstable", "s", [info, warn], {}, None, "src")
    assert d.exit_code() == 1 and d.worst_severity() == "warning"
    assert d.to_dict()["findings"][1]["code"] == "y"


def test_module_does_not_import_torch_or_transformers() -> None:
    modules = sorted(p.stem for p in (Path(__file__).parents[2] / "src/tunewise/doctor").glob("*.py"))
    code = (
        f"import sys; import {', '.join('tunewise.doctor.' + m for m in modules)}; "
        "print(sorted(m for m in ('torch', 'transformers', 'tensorboard') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(Path(__file__).parents[2] / "src")},
    )
    assert out.stdout.strip() == "[]"
